"""Torrents: deterministic creation, seeding with checks and fast resume, swarm and web-seed fetches.

Real libtorrent sessions on loopback. Sources that send bad data sit on 127.0.0.2, because libtorrent
bans the whole IP of a peer that sent a bad piece.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import libtorrent as lt
import pytest

from shardtool.errors import FetchError, ShardtoolError, VerifyError
from shardtool.manifest import load
from shardtool.transport import FetchOptions, fetch_shard, fetch_shards
from shardtool.transport.http import HttpOptions
from shardtool.transport.seed import Seeder
from shardtool.transport.serve import ShardServer
from shardtool.transport.swarm import fetch_from_swarm
from shardtool.transport.torrent import TorrentOptions, create_torrent, piece_size_for, write_torrents
from tests.faulty_http import Faults, FaultyMirror
from tests.shardset import make_shard_set
from tests.util import BIN, cli, wait_until

LOOPBACK = TorrentOptions(listen="127.0.0.1:0", stall_timeout=20)


def build(root: Path, web_seeds=()) -> Path:
    make_shard_set(root, {"train": (4, 16), "val": (1, 4)}, payload=60_000)
    write_torrents(root / "manifest.json", web_seeds=web_seeds)
    return root


def same_files(a: Path, b: Path, names) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A shard set with torrents, seeded in-process on 127.0.0.1."""
    root = build(tmp_path_factory.mktemp("seeded") / "shards")
    with Seeder(load(root), root, LOOPBACK) as seeder:
        yield root, seeder


# ---- creating ----------------------------------------------------------------------------------


def test_piece_size_rule():
    assert piece_size_for(0) == 256 << 10
    assert piece_size_for(1 << 30) == 256 << 10  # 4096 pieces of 256 KiB
    assert piece_size_for((1 << 30) + 1) == 512 << 10
    assert piece_size_for(150 * 10**9) == 16 << 20  # ImageNet: capped
    assert piece_size_for(40 * 10**9) == 16 << 20
    assert piece_size_for(20 * 10**9) == 8 << 20


def test_same_shards_same_torrent_v1_sorted_no_date(tmp_path):
    a = build(tmp_path / "a", web_seeds=["http://mirror.example/shards"])
    b = build(tmp_path / "b", web_seeds=["http://mirror.example/shards"])
    ma, mb = load(a), load(b)
    assert ma.sources.torrents == mb.sources.torrents  # info-hash, magnet, file, name
    info = ma.sources.torrents["train"]
    assert info.name == "testset-train" and info.file == "testset-train.torrent"
    assert info.magnet.startswith(f"magnet:?xt=urn:btih:{info.infohash}&dn=testset-train")
    data = (a / info.file).read_bytes()
    assert data == (b / info.file).read_bytes()
    top = lt.bdecode(data)
    assert set(top) == {b"info", b"url-list"}  # no creation date, no creator
    assert top[b"url-list"] in (b"http://mirror.example/shards/", [b"http://mirror.example/shards/"])
    meta = top[b"info"]
    assert set(meta) == {b"files", b"name", b"piece length", b"pieces"}  # v1 only: no v2 tree, no padding
    paths = [f[b"path"][0].decode() for f in meta[b"files"]]
    assert paths == sorted(s.name for s in ma.split("train").shards)
    # web seeds and trackers live outside the info dict: the swarm is the same whoever mirrors it
    plain, _ = create_torrent(ma, "train", a)
    assert str(lt.torrent_info(plain).info_hashes().v1) == info.infohash


def test_torrent_cli_and_its_errors(tmp_path):
    root = tmp_path / "shards"
    make_shard_set(root, {"train": (2, 4), "val": (1, 2)})
    before = (root / "manifest.json").read_bytes()
    (root / "train-000001.tar").rename(tmp_path / "away.tar")
    proc = cli("shardtool", "torrent", root / "manifest.json")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"Error: {root / 'train-000001.tar'}: missing (a torrent needs every shard of the split)"
    )
    data = bytearray((tmp_path / "away.tar").read_bytes())
    data[700] ^= 1
    (root / "train-000001.tar").write_bytes(data)
    proc = cli("shardtool", "torrent", root / "manifest.json")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: {root / 'train-000001.tar'}: sha256 differs from the manifest (re-fetch or rebuild it)"
    )
    assert (root / "manifest.json").read_bytes() == before and not list(root.glob("*.torrent"))
    proc = cli("shardtool", "torrent", "http://127.0.0.1:9/manifest.json")
    assert proc.returncode == 1 and proc.stderr.startswith(
        "Error: http://127.0.0.1:9/manifest.json: cannot fetch"
    )

    (tmp_path / "away.tar").rename(root / "train-000001.tar")
    proc = cli(
        "shardtool", "torrent", root / "manifest.json", "--split", "val", "--tracker", "http://t/announce"
    )
    assert proc.returncode == 0, proc.stderr
    _, infohash, file, magnet = proc.stdout.strip().split("\t")
    manifest = load(root)
    assert list(manifest.sources.torrents) == ["val"]
    assert manifest.sources.torrents["val"].infohash == infohash and (root / file).exists()
    assert "tr=http%3a%2f%2ft%2fannounce" in magnet


# ---- seeding -----------------------------------------------------------------------------------


def test_seed_checks_shards_and_uses_fast_resume_only_when_unchanged(tmp_path):
    root = build(tmp_path / "shards")
    manifest = load(root)
    with Seeder(manifest, root, LOOPBACK) as seeder:
        assert (
            not any(s.resumed for s in seeder.seeded)
            and seeder.status().seeding == manifest.split("train").num_bytes + manifest.split("val").num_bytes
        )
    # a new tracker in the .torrent (same info-hash) is used although the resume data predates it
    write_torrents(root / "manifest.json", trackers=["http://127.0.0.1:9/announce"])
    with Seeder(manifest, root, LOOPBACK) as seeder:
        assert all(s.resumed for s in seeder.seeded)
        assert [t["url"] for t in seeder.seeded[0].handle.trackers()] == ["http://127.0.0.1:9/announce"]

    # same size, other bytes, new mtime: resume data is not trusted, the check finds it
    path = root / "train-000002.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(data)
    with pytest.raises(VerifyError, match=r"train-000002.tar differ from the manifest"):
        Seeder(manifest, root, LOOPBACK).start()

    # a peer holding only some shards seeds those
    path.unlink()
    (root / "train-000000.tar").unlink()
    with Seeder(manifest, root, LOOPBACK, splits=["train"]) as seeder:
        (train,) = seeder.seeded
        assert train.missing == ["train-000000.tar", "train-000002.tar"]
        assert [s.name for s in train.shards] == ["train-000001.tar", "train-000003.tar"]


def test_seed_cli_then_fetch_cli_a_subset(seeded, tmp_path, children):
    root, _ = seeded
    errors = tmp_path / "seed.err"
    proc = children.start(
        BIN / "shardtool", "seed", root / "manifest.json", "--listen", "127.0.0.1:0",
        stdout=subprocess.PIPE, stderr=errors.open("w"), text=True,
    )  # fmt: skip
    lines = [proc.stdout.readline() for _ in range(3)]
    infohash = load(root).sources.torrents["train"].infohash
    assert lines[0].startswith(f"train magnet:?xt=urn:btih:{infohash}")
    address = re.match(r"listening on (127\.0\.0\.1:\d+) ", lines[2])[1]
    out = tmp_path / "out"
    fetched = cli(
        "shardtool", "fetch", root / "manifest.json", "--out", out, "--via", "torrent", "--peer", address,
        "--split", "train", "--shards", "1-2", "--json",
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    summary = json.loads(fetched.stdout)
    assert summary["fetched"] == 2 and set(summary["sources"].values()) == {f"torrent:{infohash}"}
    assert {p.name for p in out.glob("*.tar")} == {"train-000001.tar", "train-000002.tar"}
    assert same_files(root, out, ["train-000001.tar", "train-000002.tar"])
    assert not list((out / ".shardtool-partial").glob("*.bt"))  # renamed into place, nothing left over
    assert (out / "testset-train.torrent").exists()  # so that this folder can seed in turn
    wait_until(
        lambda: re.search(r"seeding: \d+ peers, up .*/s, uploaded .*, ratio \d", errors.read_text()),
        what="the status line",
    )
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert errors.read_text().rstrip().endswith("stopped")


def test_fetch_shard_via_torrent_resumes_a_partial_file(seeded, tmp_path):
    root, seeder = seeded
    manifest = load(root)
    shard = manifest.split("train").shards[3]
    partial = tmp_path / ".shardtool-partial" / f"{shard.name}.bt"
    partial.parent.mkdir()
    partial.write_bytes((root / shard.name).read_bytes()[: shard.size * 9 // 10])
    result = fetch_from_swarm(
        (root / "testset-train.torrent").read_bytes(),
        manifest,
        "train",
        [shard],
        tmp_path,
        TorrentOptions(peers=(seeder.address,)),
    )
    assert list(result.done) == [shard.name] and result.failed == {}
    # the pieces wholly inside the partial file were re-checked, not downloaded again
    assert result.downloaded < shard.size / 2
    assert same_files(root, tmp_path, [shard.name])
    # the one-shard API, as the shard cache calls it
    other = manifest.split("train").shards[0]
    path = fetch_shard(manifest, other, tmp_path, via="torrent", peers=[seeder.address])
    assert path == tmp_path / other.name and same_files(root, tmp_path, [other.name])


def test_fetch_shard_auto_reports_every_route_it_tried(tmp_path):
    """On demand, auto tries the HTTP mirrors and then the torrent; the error says what each one did."""
    root = build(tmp_path / "shards")
    manifest = load(root)
    shard = manifest.split("val").shards[0]
    with FaultyMirror(root, Faults(corrupt={shard.name})) as bad, pytest.raises(FetchError) as err:
        fetch_shard(manifest, shard, tmp_path / "out", mirrors=[bad.url], torrent_options=LOOPBACK)
    url = bad.url + shard.name
    assert [f.source for f in err.value.failures] == [url, "torrent"]
    assert str(err.value) == (
        f"{shard.name}: no source gave good bytes ({url}: sha256 mismatch (expected {shard.sha256[:12]}…)); "
        f"torrent: {err.value.failures[1].reason}"
    )
    assert "no source left" in err.value.failures[1].reason  # no peer, tracker or web seed to ask
    assert not (tmp_path / "out" / shard.name).exists()


# ---- web seeds ---------------------------------------------------------------------------------


def test_web_seed_only_fetch_from_serve(tmp_path):
    root = tmp_path / "shards"
    make_shard_set(root, {"train": (3, 16)}, payload=60_000)
    with ShardServer(root) as server:
        write_torrents(root / "manifest.json", web_seeds=[server.url])
        manifest = load(root)
        out = tmp_path / "out"
        summary = fetch_shards(
            manifest,
            {"train": manifest.split("train").shards},
            out,
            FetchOptions(via="torrent", progress=False, torrent=LOOPBACK),
        )
    assert (
        summary.ok
        and len(summary.fetched) == 3
        and all(v.startswith("torrent:") for v in summary.fetched.values())
    )
    assert same_files(root, out, [s.name for s in manifest.split("train").shards])


def test_auto_uses_mirrors_as_web_seeds(tmp_path):
    """--via auto: the torrent, with a mirror that has the web-seed layout and Range support as web seed."""
    root = build(tmp_path / "shards")
    manifest = load(root)
    with ShardServer(root) as server:
        summary = fetch_shards(
            manifest,
            {"train": manifest.split("train").shards},
            tmp_path / "out",
            FetchOptions(mirrors=(server.url,), progress=False, torrent=LOOPBACK),
        )
    infohash = manifest.sources.torrents["train"].infohash
    assert summary.ok and set(summary.fetched.values()) == {f"torrent:{infohash}"}
    assert same_files(root, tmp_path / "out", [s.name for s in manifest.split("train").shards])


def test_corrupt_web_seed_next_to_a_good_peer(seeded, tmp_path):
    root, seeder = seeded
    manifest = load(root)
    shards = manifest.split("train").shards
    with FaultyMirror(root, Faults(corrupt={s.name for s in shards}), host="127.0.0.2") as bad:
        result = fetch_from_swarm(
            (root / "testset-train.torrent").read_bytes(),
            manifest,
            "train",
            shards,
            tmp_path,
            TorrentOptions(peers=(seeder.address,), stall_timeout=20),
            web_seeds=[bad.url],
        )
    assert result.failed == {} and sorted(result.done) == [s.name for s in shards]
    assert same_files(root, tmp_path, [s.name for s in shards])


def test_corrupt_web_seed_alone_is_dropped_and_reported(seeded, tmp_path):
    root, _ = seeded
    manifest = load(root)
    shards = manifest.split("train").shards
    start = time.monotonic()
    with FaultyMirror(root, Faults(corrupt={shards[1].name}), host="127.0.0.2") as bad:
        result = fetch_from_swarm(
            (root / "testset-train.torrent").read_bytes(),
            manifest,
            "train",
            [shards[1]],
            tmp_path,
            TorrentOptions(web_seed_failures=1, stall_timeout=60),
            web_seeds=[bad.url],
        )
    assert time.monotonic() - start < 30  # long before the stall timeout: nothing else could deliver
    assert result.done == {} and "no source left" in result.failed[shards[1].name]
    assert any(p.startswith(f"web seed {bad.url}: dropped") for p in result.problems)
    assert not (tmp_path / shards[1].name).exists()


def test_auto_falls_back_to_http_for_a_mirror_unfit_as_web_seed(seeded, tmp_path):
    """A mirror that ignores Range would stall libtorrent: auto mode fetches from it over plain HTTP."""
    root, _ = seeded
    manifest = load(root)
    with FaultyMirror(root, Faults(ignore_range=True)) as mirror:
        summary = fetch_shards(
            manifest,
            {"val": manifest.split("val").shards},
            tmp_path,
            FetchOptions(
                via="auto", mirrors=(mirror.url,), progress=False, torrent=LOOPBACK, http=HttpOptions()
            ),
        )
        assert all(r.range == "bytes=0-0" for r in mirror.requests[:1])  # the web-seed probe
    assert summary.ok and summary.fetched == {"val-000000.tar": mirror.url + "val-000000.tar"}
    assert same_files(root, tmp_path, ["val-000000.tar"])


def test_seed_user_errors(tmp_path):
    root = tmp_path / "shards"
    make_shard_set(root, {"train": (1, 2)})
    proc = cli("shardtool", "seed", root / "manifest.json", "--listen", "127.0.0.1:0")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: {root / 'manifest.json'}: no torrent to seed (create one with `shardtool torrent {root / 'manifest.json'}`)"
    )
    write_torrents(root / "manifest.json")
    for listen, message in (("nowhere", "--listen 'nowhere' is not HOST:PORT"),):
        proc = cli("shardtool", "seed", root / "manifest.json", "--listen", listen)
        assert proc.returncode == 1 and proc.stderr.strip() == f"Error: {message}"
    with ShardServer(root) as server:
        proc = cli("shardtool", "seed", server.url + "manifest.json")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: {server.url}manifest.json: a manifest fetched by URL needs --dir (the shard folder)"
    )
    os.unlink(root / "testset-train.torrent")
    with pytest.raises(ShardtoolError, match=r"testset-train\.torrent: missing"):
        Seeder(load(root), root, LOOPBACK).start()
    shutil.rmtree(root)
