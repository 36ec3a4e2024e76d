"""`shardtool serve` / ShardServer: what it serves, Range and HEAD, traversal, concurrency, logging."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import httpx
import pytest

from shardtool.transport.serve import ShardServer
from shardtool.transport.torrent import write_torrents
from tests.shardset import make_shard_set
from tests.util import cli, free_port, wait_until


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    make_shard_set(root / "shards", {"train": (3, 8), "val": (1, 4)})
    (root / "secret.txt").write_text("outside the shard folder")
    (root / "shards" / "notes.txt").write_text("inside, but not in the manifest")
    return root / "shards"


@pytest.fixture(scope="module")
def server(shard_dir):
    with ShardServer(shard_dir) as server:
        yield server


def raw_get(server: ShardServer, target: bytes) -> tuple[int, bytes]:
    """Send a request line exactly as given (no client-side normalisation of the path)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_serves_manifest_and_shards_with_head_and_ranges(server, shard_dir):
    assert server.url == f"http://127.0.0.1:{server.port}/"
    manifest = httpx.get(server.url + "manifest.json")
    assert manifest.status_code == 200
    assert manifest.content == (shard_dir / "manifest.json").read_bytes()

    name = "train-000001.tar"
    body = (shard_dir / name).read_bytes()
    full = httpx.get(server.url + name)
    assert full.content == body and int(full.headers["content-length"]) == len(body)
    head = httpx.head(server.url + name)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(body) and not head.content
    assert head.headers["accept-ranges"] == "bytes"

    part = httpx.get(server.url + name, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == body[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(body)}"
    tail = httpx.get(server.url + name, headers={"Range": "bytes=-512"})
    assert tail.status_code == 206 and tail.content == body[-512:]
    rest = httpx.get(server.url + name, headers={"Range": f"bytes={len(body) - 10}-"})
    assert rest.status_code == 206 and rest.content == body[-10:]
    for bad in (f"bytes={len(body)}-", "bytes=500-100", "bytes=0-1,5-6"):
        resp = httpx.get(server.url + name, headers={"Range": bad})
        assert resp.status_code == 416, bad


def test_web_seed_layout_and_only_manifest_files(server, shard_dir):
    body = (shard_dir / "val-000000.tar").read_bytes()
    assert httpx.get(server.url + "testset-val/val-000000.tar").content == body
    # the layout holds only the split's own shards, and nothing the manifest does not name is served
    for path in ("testset-train/val-000000.tar", "notes.txt", ".shardtool-partial/x", "", "testset-val/"):
        assert httpx.get(server.url + path).status_code == 404, path
    assert httpx.post(server.url + "manifest.json").status_code == 405


def test_never_serves_outside_the_folder(server):
    secret = b"outside the shard folder"
    targets = [
        b"/../secret.txt",
        b"/%2e%2e/secret.txt",
        b"/..%2fsecret.txt",
        b"/%2e%2e%2fsecret.txt",
        b"/testset-train/../../secret.txt",
        b"/testset-train/%2e%2e/%2e%2e/secret.txt",
        b"//secret.txt",
        b"/..\\secret.txt",
        b"/%5c..%5csecret.txt",
        b"/train-000000.tar%00.txt",
        b"/train-000000.tar/../../secret.txt",
        b"/%252e%252e/secret.txt",
        b"/../../../../../../etc/passwd",
        b"http://127.0.0.1/../secret.txt",
    ]
    for target in targets:
        status, body = raw_get(server, target)
        assert status in (400, 404), target
        assert secret not in body and b"root:" not in body, target


def test_no_content_negotiation_to_a_gz_sibling(server, shard_dir):
    """aiohttp's FileResponse would serve `<name>.gz` to a gzip-accepting client: other bytes."""
    (shard_dir / "val-000000.tar.gz").write_bytes(b"not the shard")
    try:
        resp = httpx.get(server.url + "val-000000.tar", headers={"Accept-Encoding": "gzip"})
        assert resp.content == (shard_dir / "val-000000.tar").read_bytes()
    finally:
        (shard_dir / "val-000000.tar.gz").unlink()


def test_many_concurrent_clients(server, shard_dir):
    names = ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    expected = {n: (shard_dir / n).read_bytes() for n in names}
    errors = []

    def worker(i: int) -> None:
        try:
            with httpx.Client() as client:
                for k in range(4):
                    name = names[(i + k) % len(names)]
                    if client.get(server.url + name).content != expected[name]:
                        errors.append(name)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors


def test_one_log_line_per_request(server, caplog):
    caplog.set_level(logging.INFO, logger="shardtool.transport.serve")
    for path in ("manifest.json", "train-000000.tar", "nope.tar"):
        httpx.get(server.url + path, headers={"Range": "bytes=0-9"})
    wait_until(lambda: len([r for r in caplog.records if '"GET /' in r.getMessage()]) == 3, what="3 lines")
    lines = [r.getMessage() for r in caplog.records if '"GET /' in r.getMessage()]
    assert any("/train-000000.tar" in line and " 206 " in line and "bytes=0-9" in line for line in lines)
    assert any("/nope.tar" in line and " 404 " in line for line in lines)


def test_picks_up_new_torrents(tmp_path):
    make_shard_set(tmp_path, {"train": (2, 4)})
    with ShardServer(tmp_path) as server:
        assert httpx.get(server.url + "testset-train.torrent").status_code == 404
        write_torrents(tmp_path / "manifest.json", web_seeds=[server.url])
        resp = httpx.get(server.url + "testset-train.torrent")
        assert resp.status_code == 200 and resp.content == (tmp_path / "testset-train.torrent").read_bytes()


def test_cli_serve_prints_url_and_serves(shard_dir, children):
    import subprocess

    from tests.util import BIN

    port = free_port()
    proc = children.start(
        BIN / "shardtool",
        "serve",
        shard_dir,
        "--port",
        str(port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = proc.stdout.readline().decode().strip()
    assert url == f"http://127.0.0.1:{port}/"
    assert httpx.get(url + "train-000002.tar").content == (shard_dir / "train-000002.tar").read_bytes()
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    assert '"GET /train-000002.tar HTTP/1.1" 200' in proc.stderr.read().decode()


def test_cli_serve_user_errors(tmp_path, shard_dir):
    proc = cli("shardtool", "serve", tmp_path / "nowhere")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'nowhere' / 'manifest.json'}: no such manifest"
    ]
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = cli("shardtool", "serve", shard_dir, "--port", str(port))
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
