"""`shardtool serve` under attack: generated traversal paths, links out of the folder, files the manifest
does not name, and hundreds of concurrent range requests. Raw sockets, so that no client normalises a
path before it reaches the server.
"""

from __future__ import annotations

import os
import random
import socket
import threading

import pytest

from shardtool.transport.serve import ShardServer
from tests.shardset import make_shard_set

SECRET = b"a file outside the shard folder"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-faults")
    shards = root / "shards"
    make_shard_set(shards, {"train": (4, 8), "val": (1, 4)}, payload=20_000)
    (root / "secret.txt").write_bytes(SECRET)
    (shards / "notes.txt").write_text("beside the shards, not in the manifest")
    (shards / "train-000099.tar").write_bytes(b"a shard name the manifest does not list")
    (shards / ".shardtool-partial").mkdir()
    (shards / ".shardtool-partial" / "train-000000.tar.part").write_bytes(b"partial")
    # a manifest-listed name that is a link out of the folder, and one that links to a sibling
    os.replace(shards / "train-000003.tar", root / "moved.tar")
    os.symlink(root / "moved.tar", shards / "train-000003.tar")
    os.replace(shards / "train-000002.tar", shards / "real-000002.tar")
    os.symlink("real-000002.tar", shards / "train-000002.tar")
    with ShardServer(shards) as server:
        yield server, shards


def raw(server: ShardServer, target: bytes, headers: bytes = b"") -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    if fields.get(b"transfer-encoding") == b"chunked":
        body = _dechunk(body)
    return status, fields, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2 :]
    return out


DOTS = [
    b"..",
    b"%2e%2e",
    b"%2E%2e",
    b".%2e",
    b"%2e.",
    b"%252e%252e",
    b"%c0%ae%c0%ae",
    b"..%00",
    b"%u002e%u002e",
    b"\xe2\x80\xa4\xe2\x80\xa4",
]
SEPS = [b"/", b"%2f", b"%2F", b"\\", b"%5c", b"//", b"/./", b"%252f"]
TARGETS = [b"secret.txt", b"etc/passwd", b"moved.tar", b"shards/manifest.json", b"notes.txt"]
PREFIXES = [b"", b"testset-train/", b"train-000000.tar/", b".shardtool-partial/", b"testset-val/"]


def traversal(rng: random.Random) -> bytes:
    sep = rng.choice(SEPS)
    up = sep.join(rng.choice(DOTS) for _ in range(rng.randint(1, 6)))
    path = b"/" + rng.choice(PREFIXES) + up + sep + rng.choice(TARGETS)
    if rng.random() < 0.2:
        path = rng.choice([b"http://127.0.0.1", b"//127.0.0.1", b""]) + path
    if rng.random() < 0.1:
        path = b"/" + b"/".join(rng.choice(DOTS) for _ in range(40)) + b"/etc/passwd"
    return path


def test_generated_traversal_paths_never_leave_the_folder(served, fault):
    fault.case(
        "serve",
        "generated traversal paths (/../, %2e%2e, double encoding, backslashes, absolute URLs)",
        lost_means="a response holding a byte of a file outside the folder",
    )
    server, shards = served

    def run(k: int, rng: random.Random) -> int:
        leaks, statuses = [], set()
        for _ in range(300):
            target = traversal(rng)
            status, _, body = raw(server, target)
            statuses.add(status)
            if (
                SECRET in body
                or b"root:" in body
                or b"beside the shards" in body
                or (status == 200 and body != (shards / "manifest.json").read_bytes())
            ):
                leaks.append((target, status, body[:60]))
        print(f"  300 paths: statuses {sorted(statuses)}")
        assert statuses <= {200, 400, 404}, statuses
        assert not leaks, leaks[:5]
        return len(leaks)

    fault.repeat(run)


def test_files_the_manifest_does_not_name_and_links_out_of_the_folder(served, fault):
    fault.case(
        "serve",
        "files not in the manifest, partial downloads, a listed name that links outside the folder",
        lost_means="a file served that the manifest does not name, or one outside the folder",
    )
    server, shards = served
    served_wrongly = []
    for target in (b"/notes.txt", b"/train-000099.tar", b"/.shardtool-partial/train-000000.tar.part",
                   b"/train-000003.tar", b"/testset-train/train-000003.tar", b"/real-000002.tar"):  # fmt: skip
        status, _, body = raw(server, target)
        if status != 404:
            served_wrongly.append((target, status, body[:40]))
    # a link to a file of the folder itself is fine
    status, _, body = raw(server, b"/train-000002.tar")
    assert status == 200 and body == (shards / "real-000002.tar").read_bytes()
    fault.once(len(served_wrongly))
    assert not served_wrongly


def expected_range(rng: random.Random, size: int) -> tuple[bytes, tuple[int, int] | None]:
    """A Range header and the (start, end) it must be answered with, or None: 416."""
    kind = rng.randrange(8)
    a, b = sorted(rng.randrange(size) for _ in range(2))
    if kind <= 2:
        return b"bytes=%d-%d" % (a, b), (a, b)
    if kind == 3:
        return b"bytes=%d-" % a, (a, size - 1)
    if kind == 4:
        n = rng.randint(1, size + 1000)
        return b"bytes=-%d" % n, (max(0, size - n), size - 1)
    if kind == 5:
        return b"bytes=%d-" % (size + rng.randrange(1000)), None
    if kind == 6:
        return b"bytes=%d-%d" % (b + 1, a) if b + 1 > a else b"bytes=5-2", None
    return rng.choice([b"bytes=0-1,5-6", b"bytes=abc", b"items=0-5", b"bytes=--1"]), None


def test_hundreds_of_concurrent_range_requests(served, fault):
    fault.case(
        "serve",
        "256 concurrent clients, random (and invalid) ranges, traversal attempts mixed in",
        lost_means="a response with wrong bytes, a 5xx, or a byte from outside the folder",
    )
    server, shards = served
    names = ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    files = {n: (shards / n).read_bytes() for n in names}

    def run(k: int, rng: random.Random) -> int:
        errors: list[str] = []
        counts: dict[int, int] = {}
        lock = threading.Lock()
        seeds = [rng.random() for _ in range(256)]

        def client(seed: float) -> None:
            r = random.Random(seed)
            for _ in range(6):
                try:
                    if r.random() < 0.15:
                        status, _, body = raw(server, traversal(r))
                        bad = status not in (400, 404) or SECRET in body
                    else:
                        name = r.choice(names)
                        header, want = expected_range(r, len(files[name]))
                        status, fields, body = raw(server, f"/{name}".encode(), b"Range: " + header + b"\r\n")
                        if want is None:
                            bad = status != 416 or body
                        else:
                            start, end = want
                            bad = status != 206 or body != files[name][start : end + 1]
                            bad = bad or fields.get(b"content-range") != b"bytes %d-%d/%d" % (
                                start,
                                end,
                                len(files[name]),
                            )
                    with lock:
                        counts[status] = counts.get(status, 0) + 1
                        if bad:
                            errors.append(f"{status}")
                except OSError as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        print(f"  {sum(counts.values())} requests from 256 clients: {dict(sorted(counts.items()))}")
        assert not errors, errors[:10]
        assert sum(counts.values()) == 256 * 6
        return len(errors)

    fault.repeat(run)


def test_serve_refuses_a_link_out_of_the_folder_with_a_warning(tmp_path, caplog):
    """The fix the suite found: a manifest-listed name that is a symbolic link leading outside DIR."""
    make_shard_set(tmp_path / "shards", {"train": (1, 2)})
    (tmp_path / "secret.txt").write_bytes(SECRET)
    name = tmp_path / "shards" / "train-000000.tar"
    name.unlink()
    os.symlink(tmp_path / "secret.txt", name)
    with ShardServer(tmp_path / "shards") as server:
        status, _, body = raw(server, b"/train-000000.tar")
    assert status == 404 and SECRET not in body
    assert f"not serving {name}: it leads outside {tmp_path / 'shards'}" in caplog.text
