"""Manifests, tars and torrents from strangers: rejected with a clear error, nothing written outside the
target folder, memory bounded.

A stranger controls the whole chain here: the manifest, the bytes it hashes, the archives a build reads,
and the torrent a fetch follows. Real servers, real subprocesses under real memory limits (RLIMIT_AS).
"""

from __future__ import annotations

import copy
import http.server
import json
import math
import random
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from shardtool.errors import ManifestError
from shardtool.manifest import Manifest, Shard, Split, validate_shard_name
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
