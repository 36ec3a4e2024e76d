"""Interoperability with stock tools from Debian's packages: aria2c and opentracker both ways, curl, and
webdataset's own `http://` URLs (which it reads through curl).

`make test` installs them (tests/system_tools.py); where it cannot, each test skips naming the package.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import webdataset as wds

from shardtool.manifest import load
from shardtool.transport.serve import ShardServer
from shardtool.transport.torrent import write_torrents
from tests.shardset import make_shard_set
from tests.system_tools import skip_unless
from tests.util import BIN, cli, free_port, wait_until

pytestmark = pytest.mark.interop

ARIA2_CLOSED = [
    "--interface=127.0.0.1",
    "--disable-ipv6=true",
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=false",
    "--summary-interval=0",
    "--console-log-level=warn",
    "--download-result=hide",
]


def seeders(tracker_port: int, infohash: str) -> int:
    """How many seeders opentracker knows for `infohash` (its scrape answer)."""
    import libtorrent as lt

    query = urllib.parse.quote_from_bytes(bytes.fromhex(infohash))
    with urllib.request.urlopen(f"http://127.0.0.1:{tracker_port}/scrape?info_hash={query}", timeout=5) as r:
        files = lt.bdecode(r.read()).get(b"files", {})
    return next(iter(files.values()), {}).get(b"complete", 0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interop") / "shards"
    make_shard_set(root, {"train": (3, 16), "val": (1, 4)}, payload=60_000)
    return root


def test_aria2c_downloads_from_shardtool_seed_through_opentracker(shard_dir, tmp_path, children):
    skip_unless("aria2c", "opentracker")
    tracker_port = free_port()
    announce = f"http://127.0.0.1:{tracker_port}/announce"
    (info,) = write_torrents(shard_dir / "manifest.json", splits=["train"], trackers=[announce]).values()
    # opentracker chroots into its folder and reads the whitelist as user nobody
    tracker_dir = tmp_path / "tracker"
    tracker_dir.mkdir(mode=0o755)
    (tracker_dir / "whitelist").write_text(info.infohash + "\n")
    (tracker_dir / "whitelist").chmod(0o644)
    children.start(
        "opentracker", "-i", "127.0.0.1", "-p", tracker_port, "-P", tracker_port, "-w", "whitelist", "-d", ".",
        cwd=tracker_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: accepting(tracker_port), what="opentracker")
    seed = children.start(
        BIN / "shardtool", "seed", shard_dir / "manifest.json", "--split", "train", "--listen", "127.0.0.1:0",
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert seed.stdout.readline().startswith(f"train magnet:?xt=urn:btih:{info.infohash}")
    wait_until(lambda: seeders(tracker_port, info.infohash) == 1, what="the seeder's announce")
    out = tmp_path / "aria2"
    proc = subprocess.run(
        ["aria2c", f"--dir={out}", *ARIA2_CLOSED, "--seed-time=0", "--bt-stop-timeout=30",
         "--check-integrity=true", str(shard_dir / info.file)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for shard in load(shard_dir).split("train").shards:
        assert sha256(out / info.name / shard.name) == shard.sha256


def test_fetch_via_torrent_from_an_aria2c_seeder(shard_dir, tmp_path, children):
    """aria2c seeds (it checks the files first); our fetch knows it only as a peer address."""
    skip_unless("aria2c")
    (info,) = write_torrents(
        shard_dir / "manifest.json", splits=["train"]
    ).values()  # no trackers, no web seeds
    layout = tmp_path / "aria2" / info.name
    layout.mkdir(parents=True)
    for shard in load(shard_dir).split("train").shards:
        (layout / shard.name).hardlink_to(shard_dir / shard.name)
    port = free_port()
    children.start(
        "aria2c", f"--dir={layout.parent}", *ARIA2_CLOSED, f"--listen-port={port}", "--seed-ratio=0.0",
        "--check-integrity=true", str(shard_dir / info.file),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: accepting(port), what="aria2c seeding")
    out = tmp_path / "out"
    proc = cli(
        "shardtool", "fetch", shard_dir / "manifest.json", "--out", out, "--via", "torrent", "--split", "train",
        "--peer", f"127.0.0.1:{port}", "--stall-timeout", "30", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["fetched"] == 3 and set(summary["sources"].values()) == {f"torrent:{info.infohash}"}
    for shard in load(shard_dir).split("train").shards:
        assert sha256(out / shard.name) == shard.sha256


def test_curl_against_serve(shard_dir, tmp_path):
    skip_unless("curl")
    with ShardServer(shard_dir) as server:
        name = "train-000001.tar"
        body = (shard_dir / name).read_bytes()
        out = tmp_path / name
        subprocess.run(["curl", "-sSf", "-o", out, server.url + name], check=True, timeout=60)
        assert out.read_bytes() == body
        head = subprocess.run(
            ["curl", "-sSfI", server.url + name], capture_output=True, text=True, check=True
        )
        assert f"content-length: {len(body)}" in head.stdout.lower()
        part = subprocess.run(
            ["curl", "-sSf", "-r", "1000-1999", server.url + name], capture_output=True, check=True
        )
        assert part.stdout == body[1000:2000]
        # curl's resume (-C -) continues a partial file with a Range request
        out.write_bytes(body[:5000])
        subprocess.run(["curl", "-sSf", "-C", "-", "-o", out, server.url + name], check=True, timeout=60)
        assert out.read_bytes() == body
        missing = subprocess.run(
            ["curl", "-sSf", server.url + "../manifest.json", "--path-as-is"], capture_output=True
        )
        assert missing.returncode == 22  # HTTP error (404)


def test_webdataset_reads_http_urls_from_serve(shard_dir):
    skip_unless("curl")
    manifest = load(shard_dir)
    with ShardServer(shard_dir) as server:
        urls = [server.url + s.name for s in manifest.split("train").shards]
        samples = list(
            wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().to_tuple("__key__", "cls")
        )
    assert len(samples) == manifest.split("train").num_samples
    assert [key for key, _ in samples[:2]] == ["train_00000000", "train_00000001"]
    assert all(isinstance(label, int) for _, label in samples)


def test_same_infohash_as_mktorrent(shard_dir, tmp_path):
    skip_unless("mktorrent")
    import libtorrent as lt

    (info,) = write_torrents(shard_dir / "manifest.json", splits=["train"], web_seeds=["http://x/"]).values()
    folder = tmp_path / info.name
    folder.mkdir()
    for shard in reversed(load(shard_dir).split("train").shards):  # creation order must not matter
        (folder / shard.name).hardlink_to(shard_dir / shard.name)
    ours = lt.torrent_info(str(shard_dir / info.file))
    log2_piece = ours.piece_length().bit_length() - 1
    subprocess.run(
        ["mktorrent", "-l", str(log2_piece), "-n", info.name, "-o", str(tmp_path / "m.torrent"), str(folder)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert str(lt.torrent_info(str(tmp_path / "m.torrent")).info_hashes().v1) == info.infohash
