"""Manifests, tars and torrents from strangers: rejected with a clear error, nothing written outside the
target folder, memory bounded.

A stranger controls the whole chain here: the manifest, the bytes it hashes, the archives a build reads,
and the torrent a fetch follows. Real servers, real subprocesses under real memory limits (RLIMIT_AS).
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import io
import json
import math
import os
import random
import resource
import tarfile
import threading
from pathlib import Path
from typing import ClassVar

import libtorrent as lt
import pytest

from shardtool.errors import ManifestError
from shardtool.fsutil import sha256_file
from shardtool.manifest import Manifest, Shard, Split, load, validate_shard_name
from tests import datagen
from tests.faults.helpers import peak_rss_mb
from tests.faulty_http import FaultyMirror
from tests.shardset import make_shard_set
from tests.util import cli

HOSTILE_VALUES = [
    "../etc/passwd",
    "../../../../tmp/escape.tar",
    "/etc/passwd",
    "/abs.tar",
    "a/b.tar",
    "a\\b.tar",
    "x\x00.tar",
    "..",
    ".",
    "",
    "\u202etxt.tar",
    "..\u2215x.tar",
    "A" * 100_000,
    10**30,
    -1,
    2**63,
    1e308,
    math.nan,
    math.inf,
    True,
    None,
    [],
    {},
    [[[[["deep"]]]]],
    {"name": "../x.tar"},
    "file:///etc/passwd",
    "http://evil.example/../../",
]


def sample_dict(tmp_path: Path) -> dict:
    return make_shard_set(tmp_path / "sample", {"train": (3, 2), "val": (1, 2)}).to_dict()


def paths_in(value, prefix=()):
    """Every path (tuple of keys and indices) into a decoded JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_in(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_in(v, (*prefix, i))


def mutate(data: dict, rng: random.Random) -> str:
    """One hostile variant of a manifest, as the text a server would send."""
    d = copy.deepcopy(data)
    kind = rng.randrange(6)
    paths = [p for p in paths_in(d) if p]
    if kind <= 2:  # replace any value with a hostile one
        *parent, last = rng.choice(paths)
        target = d
        for k in parent:
            target = target[k]
        target[last] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif kind == 3:  # drop a key or an item
        *parent, last = rng.choice(paths)
        target = d
        for k in parent:
            target = target[k]
        del target[last]
    elif kind == 4:  # text-level damage: cut, flip a byte, or nest absurdly deep
        text = json.dumps(d)
        how = rng.randrange(3)
        if how == 0:
            return text[: rng.randrange(len(text))]
        if how == 1:
            i = rng.randrange(len(text))
            return text[:i] + chr(rng.randrange(32, 0x2FF)) + text[i + 1 :]
        depth = rng.choice([100, 10_000, 200_000])
        return "[" * depth + text + "]" * depth
    else:  # the same shard twice, or a shard under a hostile name in another split
        shard = copy.deepcopy(d["splits"]["train"]["shards"][0])
        if rng.random() < 0.5:
            shard["name"] = rng.choice([v for v in HOSTILE_VALUES if isinstance(v, str)])
        d["splits"]["val"]["shards"].append(shard)
        d["splits"]["val"].pop("num_samples", None)
        d["splits"]["val"].pop("num_bytes", None)
    return json.dumps(d)


def unsafe_parts(m: Manifest, base: Path) -> list[str]:
    """What an accepted manifest must never contain: names that leave `base`, non-http sources."""
    bad = []
    for _, shard in m.shards():
        try:
            validate_shard_name(shard.name)
        except ManifestError:
            bad.append(shard.name)
        if (base / shard.name).resolve().parent != base.resolve():
            bad.append(shard.name)
    bad += [t.file for t in m.sources.torrents.values() if (base / t.file).resolve().parent != base.resolve()]
    bad += [u for u in m.sources.http if not u.startswith(("http://", "https://"))]
    return bad


def test_hostile_manifests_are_rejected_with_one_line(tmp_path, fault):
    fault.case(
        "strangers",
        "manifest mutations: traversal/absolute/NUL names, absurd numbers, bad JSON, deep nesting",
        lost_means="a mutant that crashed the loader (any error but a one-line ManifestError) or was "
        "accepted with a name that leaves the target folder",
    )
    data = sample_dict(tmp_path)
    base = tmp_path / "target"

    def run(k: int, rng: random.Random) -> int:
        bad = []
        rejected = 0
        for _ in range(1000):
            text = mutate(data, rng)
            try:
                m = Manifest.from_json(text, origin="m.json")
            except ManifestError as e:
                message = str(e)
                rejected += 1
                if "\n" in message or not message.startswith("m.json: ") or len(message) > 400:
                    bad.append(f"unclear message {message[:200]!r}")
                continue
            except Exception as e:
                bad.append(f"{type(e).__name__}: {str(e)[:100]} for {text[:120]!r}")
                continue
            if problems := unsafe_parts(m, base):
                bad.append(f"accepted unsafe {problems[:2]}")
        print(f"  1000 mutants: {rejected} rejected, {1000 - rejected} harmless ones accepted")
        assert not bad, bad[:5]
        return len(bad)

    fault.repeat(run)


class _Static(http.server.BaseHTTPRequestHandler):
    """Serves `pages` (path -> bytes); `/endless` streams without end."""

    pages: ClassVar[dict[str, bytes]] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/endless.json":
            self.send_response(200)
            self.end_headers()
            chunk = b"[" * 65536
            try:
                for _ in range(4096):  # 256 MB, far past the 64 MiB a manifest may have
                    self.wfile.write(chunk)
            except OSError:
                pass
            return
        body = self.pages.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture
def stranger(tmp_path):
    """An HTTP server run by a stranger, with hostile manifests."""

    class Handler(_Static):
        pages: ClassVar[dict[str, bytes]] = {}

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", Handler.pages
    httpd.shutdown()
    httpd.server_close()


def test_hostile_manifests_through_the_command_line(tmp_path, stranger, fault):
    fault.case(
        "strangers",
        "hostile manifests by URL to fetch/info: traversal, absurd sizes and counts, bad or endless JSON",
        lost_means="a traceback instead of a one-line error, or a file written outside the target folder",
    )
    url, pages = stranger
    data = sample_dict(tmp_path)
    cases = {}
    for name, value in [
        ("dotdot", "../../escape.tar"),
        ("slash", "x/../../e.tar"),
        ("abs", "/tmp/abs.tar"),
        ("nul", "a\x00.tar"),
    ]:
        d = copy.deepcopy(data)
        d["splits"]["train"]["shards"][0]["name"] = value
        cases[name] = (json.dumps(d), "unsafe or malformed shard name")
    d = copy.deepcopy(data)
    d["splits"]["train"]["shards"][0]["size"] = 10**15
    cases["huge-size"] = (json.dumps(d), "size must be an integer between 0 and")
    d = copy.deepcopy(data)
    d["splits"]["train"]["shards"][0]["num_samples"] = 10**12
    cases["huge-count"] = (json.dumps(d), "num_samples must be an integer between 0 and")
    d = copy.deepcopy(data)
    d["classes"] = [{"id": "c", "name": "n"}] * 1_000_001
    cases["too-many-classes"] = (json.dumps(d), "classes must be a list of at most 1000000")
    cases["invalid-json"] = ('{"format": "shardtool-manifest", "version": 1, ', "not valid JSON")
    cases["deep-json"] = ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)")
    for name, (text, _) in cases.items():
        pages[f"/{name}.json"] = text.encode()
    cases["endless"] = (None, "larger than 64 MiB, not a manifest")
    lost = 0
    for name, (_, message) in cases.items():
        for command in (["info"], ["fetch", "--out", tmp_path / "out" / name]):
            proc = cli("shardtool", command[0], f"{url}{name}.json", *command[1:], timeout=120)
            lines = proc.stderr.strip().splitlines()
            ok = proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1
            ok = ok and lines[0].startswith(f"Error: {url}{name}.json: ") and message in lines[0]
            if not ok:
                lost += 1
                print(f"{name} {command[0]}: exit {proc.returncode}: {proc.stderr[-600:]}")
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "sample" not in p.parts]
    lost += len(written)
    assert not written, written
    fault.once(lost)
    assert lost == 0


def test_manifest_memory_is_bounded(tmp_path, fault):
    """The largest manifest the loader accepts (64 MiB of shard entries) loads in bounded memory, and a
    bigger one is refused after reading 64 MiB: checked in children under RLIMIT_AS."""
    fault.case(
        "strangers",
        "a 64 MiB manifest and a 1 GB one, loaded under RLIMIT_AS = 1 GiB",
        lost_means="a loader that ran out of memory or crashed",
    )
    entry = {"name": "train-0000000.tar", "size": 123456789, "sha256": "0" * 64, "num_samples": 1000}
    n = (64 << 20) // (len(json.dumps(entry, separators=(",", ":"))) + 1) - 1000
    shards = ",".join(
        json.dumps(dict(entry, name=f"train-{i:07d}.tar", sha256=f"{i:064x}"), separators=(",", ":"))
        for i in range(n)
    )
    big = tmp_path / "big.json"
    big.write_text(
        '{"format":"shardtool-manifest","version":1,"dataset":"x","layout":"folder","classes":[],'
        f'"splits":{{"train":{{"shards":[{shards}]}}}}}}'
    )
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # sparse: a gigabyte of zeros
    lost = 0
    code = f"from shardtool.manifest import load\nm = load({str(big)!r})\nprint(len(m.split('train').shards))"
    rc, peak, _, err = peak_rss_mb(code, limit_as=1 << 30)
    print(f"{big.stat().st_size >> 20} MiB manifest, {n} shards: exit {rc}, peak RSS {peak:.0f} MB")
    lost += rc != 0
    code = f"from shardtool.manifest import load\nload({str(huge)!r})"
    rc, peak2, _, err2 = peak_rss_mb(code, limit_as=1 << 30)
    print(f"1 GB manifest: exit {rc}, peak RSS {peak2:.0f} MB: {err2.strip().splitlines()[-2:]}")
    lost += "larger than 64 MiB" not in err2 or "MemoryError" in err2
    fault.once(lost)
    assert lost == 0, (err[-1000:], err2[-1000:])
    assert peak < 600


def test_shards_whose_hashes_do_not_match(tmp_path, fault):
    fault.case(
        "strangers",
        "a manifest whose hashes match none of the served shards",
        lost_means="a file under a final name that does not match the manifest",
    )
    root = tmp_path / "shards"
    manifest = make_shard_set(root, {"train": (3, 4)})
    lying = Manifest(
        manifest.dataset,
        manifest.layout,
        manifest.classes,
        {
            "train": Split(
                [
                    Shard(s.name, s.size, f"{i:064x}", s.num_samples)
                    for i, s in enumerate(manifest.split("train").shards)
                ]
            )
        },
    )
    lying.save(tmp_path / "lying.json")
    with FaultyMirror(root) as mirror:
        proc = cli(
            "shardtool",
            "fetch",
            tmp_path / "lying.json",
            "--out",
            tmp_path / "out",
            "--from",
            mirror.url,
            "--json",
        )
    summary = json.loads(proc.stdout)
    assert proc.returncode == 1 and sorted(summary["failed"]) == [
        s.name for s in manifest.split("train").shards
    ]
    assert all("sha256 mismatch" in why for why in summary["failed"].values())
    finals = list((tmp_path / "out").glob("*.tar"))
    fault.once(len(finals))
    assert not finals


# ---- tars from strangers ------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", type_=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type_, link, len(data) if type_ == tarfile.REGTYPE else 0
    if type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


def _with_huge_member(tar_bytes: bytes, name: str, tail: bytes) -> bytes:
    """`tar_bytes` with one more member whose header declares 10 GB but whose data is `tail`."""
    data = tar_bytes.rstrip(b"\0")
    data += b"\0" * (-len(data) % 512)
    info = tarfile.TarInfo(name)
    info.size = 10 << 30
    data += info.tobuf(tarfile.GNU_FORMAT) + tail
    return data + b"\0" * (-len(data) % 512 + 1024)


def hostile_members(tar: tarfile.TarFile, stem: str, ext: str) -> None:
    _add(tar, f"../../../../tmp/escape-{stem}.{ext}", datagen.jpeg(50))
    _add(tar, f"/tmp/absolute-{stem}.{ext}", datagen.jpeg(51))
    _add(tar, f"{stem}_symlink.{ext}", type_=tarfile.SYMTYPE, link="/etc/passwd")
    _add(tar, f"{stem}_hardlink.{ext}", type_=tarfile.LNKTYPE, link="/etc/passwd")
    _add(tar, f"{stem}_device.{ext}", type_=tarfile.CHRTYPE)
    _add(tar, f"{stem}_fifo.{ext}", type_=tarfile.FIFOTYPE)


def hostile_archives(root: Path, *, huge: bool) -> None:
    """ILSVRC2012_img_train.tar whose class tar holds traversal names, links, a device, a fifo, and
    (with `huge`) a member declaring 10 GB."""
    wnid = datagen.WNIDS[0]
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as t:
        for i in range(6):
            _add(t, f"{wnid}_{i}.JPEG", datagen.jpeg(i))
        hostile_members(t, wnid, "JPEG")
    data = (
        _with_huge_member(inner.getvalue(), f"{wnid}_huge.JPEG", datagen.jpeg(9))
        if huge
        else inner.getvalue()
    )
    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as t:
        _add(t, f"{wnid}.tar", data)


def outside_files(tmp_path: Path, allowed: list[Path]) -> list[Path]:
    found = [p for p in tmp_path.rglob("*") if p.is_file() and not any(a in p.parents for a in allowed)]
    found += [
        Path(p) for p in ("/tmp/absolute-n01440764.JPEG", "/tmp/escape-n01440764.JPEG") if os.path.lexists(p)
    ]
    return found


def test_hostile_archives_for_the_imagenet_build(tmp_path, fault):
    fault.case(
        "strangers",
        "ImageNet archives with ../ and absolute member names, links, a device, a fifo, a 10 GB member",
        lost_means="a traceback, a file written outside --out, or a member that vanished without a reason",
    )
    lost = 0
    limit = _limit_as(2 << 30)
    # with a member declaring 10 GB: one line naming the archive, under a 2 GiB address-space limit
    hostile_archives(tmp_path / "huge", huge=True)
    proc = cli("shardtool", "build", tmp_path / "huge", "--out", tmp_path / "out-huge", preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    print(proc.stderr[-1500:])
    ok = proc.returncode == 1 and "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    lost += not (
        ok and "n01440764.tar: truncated (member n01440764_huge.JPEG runs past the end)" in lines[-1]
    )
    # without it: the build goes through; links, the device and the fifo are listed as skipped
    hostile_archives(tmp_path / "links", huge=False)
    out = tmp_path / "out-links"
    proc = cli("shardtool", "build", tmp_path / "links", "--out", out, preexec_fn=limit)
    print(proc.stderr[-1500:])
    assert proc.returncode == 0, proc.stderr
    manifest = load(out)
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in manifest.skipped}
    for kind in ("symlink", "hardlink", "device", "fifo"):
        if "not a regular file" not in reasons.get(f"n01440764_{kind}.JPEG", ""):
            lost += 1
            print(f"{kind} member: not listed as skipped ({reasons})")
    assert manifest.split("train").num_samples == 8  # 6 images + the two with hostile names, as samples
    escaped = outside_files(tmp_path, [tmp_path / "huge", tmp_path / "links", tmp_path / "out-huge", out])
    lost += len(escaped)
    fault.once(lost)
    assert lost == 0, escaped


def _limit_as(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def hostile_shard(root: Path) -> Manifest:
    """A shard as a stranger might make it (with a manifest that hashes it, so it passes every check):
    good samples, then ../ and absolute member names, links, a device, a fifo, and a member declaring 10 GB."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for i in range(4):
            _add(t, f"good_{i}.cls", b"%d" % (i % 2))
            _add(t, f"good_{i}.jpg", datagen.jpeg(i))
        _add(t, "../../../../tmp/escape-n01440764.cls", b"0")
        _add(t, "../../../../tmp/escape-n01440764.jpg", datagen.jpeg(7))
        _add(t, "/tmp/absolute-n01440764.cls", b"1")
        _add(t, "/tmp/absolute-n01440764.jpg", datagen.jpeg(8))
        hostile_members(t, "odd", "jpg")
    data = _with_huge_member(buf.getvalue(), "huge.jpg", datagen.jpeg(9))
    root.mkdir(parents=True)
    (root / "train-000000.tar").write_bytes(data)
    shard = Shard("train-000000.tar", len(data), sha256_file(root / "train-000000.tar"), 7)
    manifest = make_shard_set(root / "unused", {"train": (1, 1)}, num_classes=2)
    manifest.splits = {"train": Split([shard])}
    manifest.save(root / "manifest.json")
    return load(root)


_STREAM = """
import json, os
from shardtool.manifest import load
from hivetrain.data import LoaderOptions, ShardDone, train_stream
manifest = load({root!r})
stream = train_stream(manifest, [os.path.join({root!r}, "train-000000.tar")],
                      options=LoaderOptions(batch_size=4, workers={workers}), image_size=32)
keys, done = [], []
for item in stream:
    if isinstance(item, ShardDone):
        done.append(dict(samples=item.samples, corrupt=item.corrupt, missing=item.missing, error=item.error))
    else:
        keys += item.keys
print(json.dumps(dict(keys=sorted(keys), done=done)))
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_hostile_shard_in_verify_and_the_training_stream(tmp_path, fault, workers):
    fault.case(
        "strangers",
        f"a hash-matching hostile shard ({workers} loader workers): ../ names, links, device, 10 GB member",
        lost_means="a crash, unbounded memory, a file written anywhere, or samples lost without being counted",
    )
    root = tmp_path / "shards"
    hostile_shard(root)
    proc = cli("shardtool", "verify", root / "manifest.json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "train-000000.tar: not a readable tar (unexpected end of data)" in proc.stdout, proc.stdout
    rc, peak, out, err = peak_rss_mb(_STREAM.format(root=str(root), workers=workers), timeout=180)
    print(f"stream: exit {rc}, peak RSS {peak:.0f} MB")
    assert rc == 0, err[-3000:]
    result = json.loads(_last_json(out))
    (done,) = result["done"]
    print(result)
    lost = 0
    good = [f"good_{i}" for i in range(4)]
    lost += not set(good) <= set(result["keys"])
    lost += done["error"] != "ReadError: unexpected end of data"
    lost += done["samples"] + done["corrupt"] + done["missing"] < 7  # every sample the manifest names
    lost += peak > 1500
    lost += len(outside_files(tmp_path, [root]))
    fault.once(lost)
    assert lost == 0


def _last_json(text: str) -> str:
    return next(line for line in reversed(text.splitlines()) if line.startswith("{"))


# ---- a torrent from a stranger ------------------------------------------------------------------


def test_hostile_torrent_paths_stay_inside_the_target(tmp_path, fault):
    """A .torrent (matching the stranger's manifest) whose files are named ../../x, /abs/x and <name>/../x:
    fetch --via torrent from a web seed writes only inside --out."""
    fault.case(
        "strangers",
        "a torrent whose file paths hold ../, absolute parts and a hostile torrent name",
        lost_means="a file written outside --out, or a shard under its final name that fails sha256",
    )
    root = tmp_path / "shards"
    manifest = make_shard_set(root, {"train": (3, 8)}, payload=40_000)
    shards = manifest.split("train").shards
    paths = [
        ["..", "..", "..", "escape", shards[0].name],
        ["", "etc", shards[1].name],
        ["..", shards[2].name],
    ]
    piece = 256 << 10
    blob = b"".join((root / s.name).read_bytes() for s in shards)
    pieces = b"".join(hashlib.sha1(blob[i : i + piece]).digest() for i in range(0, len(blob), piece))
    with FaultyMirror(root) as mirror:
        info = {
            b"name": b"../../../escape-torrent",
            b"piece length": piece,
            b"pieces": pieces,
            b"files": [
                {b"length": s.size, b"path": [p.encode() for p in path]} for s, path in zip(shards, paths)
            ],
        }
        data = lt.bencode({b"info": info, b"url-list": [mirror.url.encode()]})
        ti = lt.torrent_info(lt.bdecode(data))
        (root / "hostile.torrent").write_bytes(data)
        d = manifest.to_dict()
        d["sources"]["torrents"] = {
            "train": {
                "infohash": str(ti.info_hashes().v1),
                "magnet": "magnet:?",
                "file": "hostile.torrent",
                "name": "../../../escape-torrent",
            }
        }
        (root / "manifest.json").write_text(json.dumps(d))
        out = tmp_path / "deep" / "out"
        proc = cli(
            "shardtool", "fetch", root / "manifest.json", "--out", out, "--via", "torrent", "--json",
            "--stall-timeout", "20", timeout=120,
        )  # fmt: skip
    print(proc.stdout[-1500:], proc.stderr[-1500:])
    escaped = outside_files(tmp_path, [root, out])
    escaped += [
        p
        for p in (tmp_path.parent / "escape", tmp_path / "escape", Path("/etc") / shards[1].name)
        if p.exists()
    ]
    bad = [s.name for s in shards if (out / s.name).exists() and sha256_file(out / s.name) != s.sha256]
    lost = len(escaped) + len(bad)
    fault.once(lost)
    assert lost == 0, (escaped, bad)
    assert proc.returncode == 0 and sorted(p.name for p in out.glob("*.tar")) == [s.name for s in shards]
