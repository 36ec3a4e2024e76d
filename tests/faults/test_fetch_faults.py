"""`shardtool fetch` under faults: misbehaving HTTP mirrors, a BitTorrent peer that sends bad pieces, and
fetches killed with SIGKILL at random points.

The properties checked every time: no file under a final shard name that fails its sha256; a rerun uses
what the killed run downloaded (Range requests from where it stopped); the exit code and the summary name
exactly the shards that are not there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from shardtool.manifest import load
from shardtool.transport.seed import Seeder
from shardtool.transport.torrent import TorrentOptions, write_torrents
from shardtool.verify import verify_shard
from tests.faults.helpers import wait_group_gone
from tests.faulty_http import Faults, FaultyMirror
from tests.shardset import make_shard_set
from tests.util import BIN, cli

FAST = ["--timeout", "1", "--retries", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """6 train shards of ~500 KB."""
    root = tmp_path_factory.mktemp("fetch-faults") / "shards"
    make_shard_set(root, {"train": (6, 8)}, payload=60_000)
    return root


def verified_on_disk(out: Path, manifest) -> set[str]:
    return {s.name for _, s in manifest.shards() if verify_shard(out / s.name, s) is None}


def bad_finals(out: Path, manifest) -> list[str]:
    """Files under a final shard name that fail verification: the one thing that must never happen."""
    return [s.name for _, s in manifest.shards() if (out / s.name).exists() and verify_shard(out / s.name, s)]


def fetch(manifest_path, out, *args) -> tuple[subprocess.CompletedProcess, dict]:
    proc = cli("shardtool", "fetch", manifest_path, "--out", out, "--via", "http", "--json", *args)
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc, summary


def test_every_kind_of_bad_mirror_at_once(shards, tmp_path, fault):
    """Six mirrors: one closes mid-body, one stalls past the timeout, one answers 500, one serves a wrong
    byte, one a truncated file, and one is good but lacks a shard that every other mirror gets wrong (or
    lacks too: pieces of good bytes from several mirrors would make it whole, as a fetch resumes)."""
    fault.case(
        "fetch",
        "HTTP mirrors: mid-body close, stall past timeout, 500s, a wrong byte, truncated files",
        lost_means="a file under a final name that fails sha256; a shard missing but not reported, "
        "or reported failed but present",
    )
    manifest = load(shards)
    names = [s.name for s in manifest.split("train").shards]
    rng = fault.rng()
    doomed = rng.choice(names[2:])  # no mirror serves it correctly; names[1] starts at the stalling one
    wrong = {n: rng.randrange(s.size) for n, s in zip(names, manifest.split("train").shards)}
    faults = [
        Faults(drop_after=rng.randrange(50_000, 200_000), wrong_byte={doomed: wrong[doomed]}),
        Faults(stall_after=rng.randrange(0, 60_000), missing={doomed}),  # good bytes would let it resume
        Faults(status=500),
        Faults(wrong_byte=wrong),
        Faults(
            truncate={
                n: s.size - rng.randrange(1, 5000) for n, s in zip(names, manifest.split("train").shards)
            }
        ),
        Faults(missing={doomed}),
    ]
    mirrors = [FaultyMirror(shards, f, host=f"127.0.0.{k + 2}").start() for k, f in enumerate(faults)]
    try:
        out = tmp_path / "out"
        args = [a for m in mirrors for a in ("--from", m.url)]
        proc, summary = fetch(shards / "manifest.json", out, *args, *FAST, "-j", "3")
    finally:
        for m in mirrors:
            m.stop()
    print(proc.stdout[-3000:], proc.stderr[-2000:])
    lost = len(bad_finals(out, manifest))
    present = verified_on_disk(out, manifest)
    # exactly the doomed shard failed, and the summary, the exit code and the last line say so
    assert proc.returncode == 1, proc.stderr
    assert set(summary["failed"]) == {doomed} == set(names) - present
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"Error: 1 of {len(names)} shards not fetched ({doomed}: ")
    )
    lost += len((set(names) - {doomed}) - present)
    problems = "\n".join(summary["problems"] + list(summary["failed"].values()))
    # each failure reported with its mirror: the doomed shard went through them all, and shard 1 (spread
    # over the mirrors by position) began at the stalling one
    expected = {
        f"{mirrors[1].url}{names[1]}: timed out (gave up after 2 tries)",
        f"{mirrors[2].url}{doomed}: HTTP 500 (gave up after 2 tries)",
        f"{mirrors[3].url}{doomed}: sha256 mismatch",
        f"{mirrors[4].url}{doomed}: has ",
        f"{mirrors[5].url}{doomed}: HTTP 404",
    }
    for what in expected:
        assert what in problems, what
    assert not list((out / ".shardtool-partial").glob("*.part")) or all(
        p.stat().st_size < manifest.find_shard(p.name[:-5])[1].size
        for p in (out / ".shardtool-partial").glob("*.part")
    )
    fault.once(lost)
    assert lost == 0


def test_fetch_killed_at_random_points_then_rerun_resumes(tmp_path, children, fault):
    fault.case(
        "fetch",
        "fetch killed (SIGKILL) at random points, then rerun",
        lost_means="a file under a final name that fails sha256; a partial download not resumed; "
        "a shard missing after the rerun",
    )
    root = tmp_path / "shards"
    manifest = make_shard_set(root, {"train": (6, 8)}, payload=120_000)  # ~1 MB each
    total = sum(s.size for _, s in manifest.shards())
    slow = FaultyMirror(root, Faults(rate=1.5e6)).start()
    good = FaultyMirror(root, host="127.0.0.2").start()

    def run(k: int, rng: random.Random) -> int:
        out = tmp_path / f"out{k}"
        lost = 0
        delay = rng.uniform(0.2, 2.0)
        proc = children.start(
            BIN / "shardtool", "fetch", root / "manifest.json", "--out", out, "--via", "http",
            "--from", slow.url, "-j", "2", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            (os.killpg if rng.random() < 0.5 else os.kill)(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        wait_group_gone(proc.pid)
        bad = bad_finals(out, manifest)
        lost += len(bad)
        assert not bad, f"killed at {delay:.2f} s: {bad} under final names fail their sha256"
        partial = out / ".shardtool-partial"
        kept = (
            {p.name[: -len(".part")]: p.stat().st_size for p in partial.glob("*.part")}
            if partial.exists()
            else {}
        )
        done = {p.name for p in out.glob("*.tar")}
        print(f"  killed at {delay:.2f} s: {len(done)} shards done, partial {kept}")
        before = len(good.requests)
        proc, summary = fetch(root / "manifest.json", out, "--from", good.url, "-j", "2")
        assert proc.returncode == 0, proc.stderr
        lost += len(set(n for _, s in manifest.shards() for n in [s.name]) - verified_on_disk(out, manifest))
        ranges = {r.path.lstrip("/"): r.range for r in good.requests[before:]}
        # a partial file cut short is completed with a Range request; a whole one (killed before its
        # rename) needs no request at all
        wanted = {
            n: None if size == manifest.find_shard(n)[1].size else f"bytes={size}-"
            for n, size in kept.items()
            if size
        }
        not_resumed = [n for n, want in wanted.items() if (ranges.get(n) != want if want else n in ranges)]
        lost += len(not_resumed)
        assert not not_resumed, f"partial downloads not resumed: {not_resumed} ({ranges})"
        assert summary["bytes"] == total - sum(manifest.find_shard(n)[1].size for n in done) - sum(
            kept.values()
        )
        assert summary["present"] == len(done)
        return lost

    try:
        fault.repeat(run)
    finally:
        slow.stop()
        good.stop()


# ---- a BitTorrent peer that sends bad pieces ---------------------------------------------------


@pytest.fixture
def swarm_sources(tmp_path):
    """A good seeder on 127.0.0.3 and a seeder on 127.0.0.2 whose copies of two shards are corrupted after
    its check (so it serves bad pieces); libtorrent bans a bad sender's whole IP, hence two addresses."""
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    make_shard_set(good_dir, {"train": (4, 16)}, payload=60_000)
    write_torrents(good_dir / "manifest.json")
    bad_dir.mkdir()
    for path in good_dir.iterdir():
        (bad_dir / path.name).write_bytes(path.read_bytes())
    manifest = load(good_dir)
    good = Seeder(manifest, good_dir, TorrentOptions(listen="127.0.0.3:0"))
    bad = Seeder(load(bad_dir), bad_dir, TorrentOptions(listen="127.0.0.2:0"))
    good.start()
    bad.start()
    corrupted = [s.name for s in manifest.split("train").shards[1:3]]
    for name in corrupted:  # in place, after the check: the seeder now reads and sends these bytes
        with open(bad_dir / name, "r+b") as f:
            f.seek(100_000)
            f.write(os.urandom(300_000))
    try:
        yield good_dir, good.address, bad.address, corrupted
    finally:
        good.close()
        bad.close()


def test_torrent_peer_sending_bad_pieces(swarm_sources, tmp_path, fault):
    fault.case(
        "fetch",
        "a BitTorrent peer that sends bad pieces (beside a good peer, in a loop; then alone)",
        lost_means="a file under a final name that fails sha256; a shard missing but not reported",
    )
    root, good, bad, corrupted = swarm_sources
    manifest = load(root)
    names = {s.name for s in manifest.split("train").shards}
    common = ["fetch", root / "manifest.json", "--via", "torrent", "--json"]

    def beside_a_good_peer(k: int, rng: random.Random) -> int:
        # everything arrives intact, even when libtorrent bans the good peer for a piece the bad one spoiled
        out = tmp_path / f"with-good-{k}"
        peers = ["--peer", bad, "--peer", good] if rng.random() < 0.5 else ["--peer", good, "--peer", bad]
        proc = cli("shardtool", *common, "--out", out, *peers, "--stall-timeout", "30")
        print(f"  {proc.stderr.count('adding the torrent again')} restart(s) after bans")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return len(bad_finals(out, manifest)) + len(names - verified_on_disk(out, manifest))

    fault.repeat(beside_a_good_peer)
    # alone: the shards it corrupts cannot be had; the summary names exactly the shards that are missing
    out = tmp_path / "alone"
    proc = cli("shardtool", *common, "--out", out, "--peer", bad, "--stall-timeout", "3")
    summary = json.loads(proc.stdout)
    present = verified_on_disk(out, manifest)
    print(summary)
    assert proc.returncode == 1
    assert set(summary["failed"]) == names - present
    assert set(corrupted) <= set(summary["failed"])
    assert (
        f"peer {bad}: banned (it sent blocks of pieces that failed their hash check)" in summary["problems"]
    )
    lost = len(bad_finals(out, manifest))
    assert not list((out / ".shardtool-partial").glob("*.tar"))
    fault.once(lost)
    assert lost == 0
