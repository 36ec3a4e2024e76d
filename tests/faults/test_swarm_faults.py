"""The shard division under faults, over real hivemind DHTs on 127.0.0.1: peers killed with SIGKILL while
they hold claims (in a loop), a peer paused with SIGSTOP for longer than its lease, a peer that claims every
shard and never reads, and malformed, oversized and forged records.

Honest peers are `ShardAssigner`s in threads (the fake consumer of tests/test_assign_dht.py); the peers
that get killed or paused run in processes of their own, forked from a zygote (tests/faults/swarm_peer.py).
Coverage comes from every peer's `shards.jsonl`: "data lost" is a shard that no peer read in the epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from hivetrain.assign import LeaseTiming, ShardAssigner
from hivetrain.dht import (
    ShardKeysValidator,
    add_epoch_keys,
    bucket_key,
    ensure_run_validators,
    make_dht,
    signing_key,
    visible_addresses,
)
from hivetrain.leases import shard_list_fingerprint
from hivetrain.metrics import MetricsRecords, metrics_key
from tests.faults.helpers import wait_group_gone
from tests.faults.swarm_peer import Zygote
from tests.test_assign_dht import consume, names, read_logs, reads_per_shard
from tests.util import loopback_dhts, wait_until


@pytest.fixture(scope="module")
def swarm():
    """Three DHT nodes on loopback, each with its own key, shared by the tests of this module."""
    with loopback_dhts(3) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def new_run(swarm, name: str) -> str:
    run_id = f"f{os.getpid()}_{name}_{time.monotonic_ns()}"
    for dht in swarm:  # every node validates the run's records, as its peers' nodes do
        ensure_run_validators(dht, run_id, schemas=[MetricsRecords])
        add_epoch_keys(dht, run_id, range(4), buckets=1)
    return run_id


def timing(**kw) -> LeaseTiming:
    return LeaseTiming(settle_s=0.05, poll_s=0.05, request_timeout_s=5, **kw)


class Honest:
    """In-process peers on the swarm's nodes, each consuming in a thread until the run's epoch is done."""

    def __init__(self, swarm, run_id, tmp: Path, shards: list[str], *, lease: float, read: float, **kw):
        self.dirs = [tmp / f"honest{k}" for k in range(len(swarm) - 1)]
        self.assigners = [
            ShardAssigner(
                shards, dht=dht, run_id=run_id, lease_s=lease, max_epochs=1, log_dir=d, **kw
            ).start()
            for dht, d in zip(swarm[1:], self.dirs)
        ]
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._consume, args=(a, read), daemon=True) for a in self.assigners
        ]
        for t in self.threads:
            t.start()

    def _consume(self, assigner, read):
        try:
            consume(assigner, read)
        except BaseException as e:
            self.errors.append(e)

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def close(self):
        for a in self.assigners:
            a.close()


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def holds_claims(log_dir: Path) -> bool:
    return len(lines(log_dir / "claims.jsonl")) > len(lines(log_dir / "shards.jsonl"))


# ---- a peer killed while it holds claims, in a loop -------------------------------------------------


def test_peer_killed_with_sigkill_while_holding_claims_in_a_loop(swarm, zygote, tmp_path, fault):
    fault.case(
        "swarm",
        "a peer SIGKILLed (whole process group) while it holds claims, at random points, in a loop",
        lost_means="shards of the epoch that no peer read",
    )
    shards, lease = names(24), 1.5

    def run(k: int, rng: random.Random) -> int:
        run_id = new_run(swarm, f"kill{k}")
        dead = tmp_path / f"run{k}" / "dead"
        pid = zygote.spawn(
            run_id=run_id, initial_peer=visible_addresses(swarm[0])[0], shards=len(shards), lease=lease,
            read=0.25, prefetch=2, log_dir=dead,
        )  # fmt: skip
        honest = Honest(swarm, run_id, tmp_path / f"run{k}", shards, lease=lease, read=0.25, timing=timing())
        try:
            wait_until(lambda: holds_claims(dead), timeout=30, what="the doomed peer to hold a claim")
            time.sleep(rng.uniform(0.0, 1.0))  # the random point (a fault, not a wait for readiness)
            os.killpg(pid, signal.SIGKILL)
            killed_at = time.time()
            wait_group_gone(pid)
            finished = {x["shard"] for x in lines(dead / "shards.jsonl")}
            in_flight = {x["shard"] for x in lines(dead / "claims.jsonl")} - finished
            assert honest.join(timeout=60), "the epoch did not complete"
            assert not honest.errors, honest.errors
        finally:
            honest.close()
        log = read_logs(dead, *honest.dirs)
        counts = reads_per_shard(log)
        lost = len({(0, s) for s in shards} - set(counts))
        duplicates = sum(counts.values()) - len(counts)
        print(
            f"  killed holding {len(in_flight)} claim(s) after {len(finished)} done; {duplicates} duplicate(s)"
        )
        assert lost == 0, f"{lost} shards never read"
        assert duplicates <= len(in_flight), (duplicates, in_flight)
        taken = [x for x in read_logs(*honest.dirs) if x["shard"] in in_flight]
        assert {x["shard"] for x in taken} == in_flight
        assert all(x["start"] <= killed_at + lease + 3.0 for x in taken), "taken over late"
        return lost

    fault.repeat(run)


# ---- a peer paused for longer than its lease ----------------------------------------------------


def test_peer_paused_longer_than_its_lease(swarm, zygote, tmp_path, fault):
    fault.case(
        "swarm",
        "a peer paused (SIGSTOP, whole group) for 3 leases while holding claims, then resumed (SIGCONT)",
        lost_means="shards of the epoch that no peer read (duplicates are counted, not lost)",
    )
    shards, lease = names(24), 1.5
    run_id = new_run(swarm, "pause")
    paused = tmp_path / "paused"
    pid = zygote.spawn(
        run_id=run_id, initial_peer=visible_addresses(swarm[0])[0], shards=len(shards), lease=lease, read=0.25,
        prefetch=2, log_dir=paused,
    )  # fmt: skip
    honest = Honest(swarm, run_id, tmp_path, shards, lease=lease, read=0.25, timing=timing())
    try:
        wait_until(lambda: holds_claims(paused), timeout=30, what="the peer to hold a claim")
        os.killpg(pid, signal.SIGSTOP)
        finished = {x["shard"] for x in lines(paused / "shards.jsonl")}
        in_flight = {x["shard"] for x in lines(paused / "claims.jsonl")} - finished
        time.sleep(3 * lease)  # the pause itself
        os.killpg(pid, signal.SIGCONT)
        assert honest.join(timeout=60), "the epoch did not complete"
        wait_until(lambda: (paused / "finished").exists(), timeout=60, what="the resumed peer to finish")
        assert not honest.errors, honest.errors
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGCONT)
        honest.close()
    wait_group_gone(pid)
    counts = reads_per_shard(read_logs(paused, *honest.dirs))
    lost = len({(0, s) for s in shards} - set(counts))
    duplicates = {s: n for (_, s), n in counts.items() if n > 1}
    print(f"paused holding {sorted(in_flight)}; read twice: {sorted(duplicates)}")
    fault.once(lost)
    assert lost == 0
    assert set(duplicates) <= in_flight and all(n == 2 for n in duplicates.values())
    # the paused peer finished what it held when it woke up: those are the duplicates
    assert in_flight <= {x["shard"] for x in lines(paused / "shards.jsonl")}


# ---- a peer that claims every shard and never reads -----------------------------------------------


@pytest.mark.parametrize("forged", [False, True], ids=["renews-its-lease", "lease-for-ever"])
def test_peer_claiming_every_shard_and_never_reading(swarm, tmp_path, fault, caplog, forged):
    """A signed, well-formed record claiming every shard, renewed like a live peer's (or with a lease that
    ends in 11 days and claim times at 0, which win every tie): honest peers read the epoch all the same."""
    fault.case(
        "swarm",
        f"a peer that claims every shard and never reads ({'lease for ever, claim time 0' if forged else 'renewed lease'})",
        lost_means="shards of the epoch that no honest peer read (the epoch must still complete)",
    )
    caplog.set_level(logging.WARNING, logger="hivetrain.assign")
    shards, lease, max_hold = names(16), 2.0, 3.0
    run_id = new_run(swarm, "greedy")
    greedy = make_dht(private_key=RSAPrivateKey(), run_id=run_id, initial_peers=visible_addresses(swarm[0]))
    key, stop = signing_key(greedy), threading.Event()

    def claim_everything():
        while not stop.is_set():
            now = get_dht_time()
            record = dict(
                peer="greedy", fp=shard_list_fingerprint(shards), time=now,
                lease_until=now + (1e6 if forged else lease), complete=-1, done=[],
                claims=[dict(e=0, i=i, t=0.0 if forged else now) for i in range(len(shards))],
            )  # fmt: skip
            greedy.store(bucket_key(run_id, 0, 0), record, now + 600, subkey=key)
            stop.wait(lease / 3)

    thread = threading.Thread(target=claim_everything, daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: (v := swarm[1].get(bucket_key(run_id, 0, 0), latest=True)) and v.value,
            what="the greedy record",
        )
        started = time.monotonic()
        honest = Honest(
            swarm, run_id, tmp_path, shards, lease=lease, read=0.05, timing=timing(max_hold_s=max_hold)
        )
        try:
            done = honest.join(timeout=max_hold + 30)
        finally:
            honest.close()
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        greedy.shutdown()
    counts = reads_per_shard(read_logs(*honest.dirs))
    lost = len({(0, s) for s in shards} - set(counts))
    print(f"epoch complete in {took:.1f} s; reads {sum(counts.values())}")
    fault.once(lost)
    assert done and lost == 0 and set(counts.values()) == {1}
    assert "has held shard" in caplog.text and "treating its claim as abandoned" in caplog.text


# ---- malformed, oversized and forged records ------------------------------------------------------


def _oversized(record: dict) -> dict:
    return dict(record, done=[dict(e=e, shards=list(range(20_000))) for e in range(16)])  # ~1 MB, valid


def _oversized_metrics() -> dict:
    return {"name": "x" * 100_000}


async def _store(key, value, subkey, expiration, _dht, node) -> bool:
    """Runs inside the hostile DHT's process: a value given as a function is built there, because
    hivemind's pipe between a DHT and its process can break on large values (seen with 100 KB and 1 MB):
    the DHT process dies and the next call blocks for good."""
    return await node.store(key, value() if callable(value) else value, expiration, subkey=subkey)


def _store_all(dht, stores, expiration) -> list[bool | None]:
    """Store each (key, value, subkey), each expiring a second after the one before (a record replaces
    one under the same subkey only if it expires later); whether a node took it, None if the attempt failed."""
    results = []
    for k, (key, value, subkey) in enumerate(stores):
        try:
            results.append(dht.run_coroutine(partial(_store, key, value, subkey, expiration + k)))
        except Exception:
            results.append(None)
    return results


def _read_seconds(dht, key: str) -> float:
    started = time.monotonic()
    dht.get(key, latest=True, return_future=True).result(timeout=30)
    return time.monotonic() - started


def test_malformed_oversized_and_forged_records(swarm, tmp_path, fault):
    """A node that validates nothing (so it keeps and serves whatever it is sent) stores garbage, records
    in other peers' names, records far larger than any peer writes, nonsense claims, and bad metrics
    records under the run's keys, while honest peers divide an epoch."""
    fault.case(
        "swarm",
        "malformed, oversized and forged (other peer's key) claim and metric records",
        lost_means="shards of the epoch that no peer read, or read twice, or a peer that crashed",
    )
    shards, lease = names(16), 2.0
    run_id = new_run(swarm, "hostile")
    key = bucket_key(run_id, 0, 0)  # 16 shards: one bucket
    quiet = _read_seconds(swarm[1], key)
    hostile = make_dht(private_key=RSAPrivateKey(), initial_peers=visible_addresses(swarm[0]))
    honest = Honest(swarm, run_id, tmp_path, shards, lease=lease, read=0.2, timing=timing())
    try:
        wait_until(lambda: any(a.held() for a in honest.assigners), what="an honest claim")
        victim, own, now = honest.assigners[0]._owner, signing_key(hostile), get_dht_time()
        fp = shard_list_fingerprint(shards)
        base = dict(peer="x", fp=fp, time=now, lease_until=now + 60, complete=-1, done=[], claims=[])
        stores = [
            (key, b"\x00garbage", own),  # malformed
            (key, {"claims": "all of them"}, b"no owner"),  # malformed, unsigned
            (key, dict(base, claims=[], complete=5), victim),  # forged: erase the victim's claims
            (key, dict(base, claims=[dict(e=0, i=i, t=0.0) for i in range(16)]), victim),  # forged claims
            (key, dict(base, claims=[dict(e=0, i=10**9, t=now)]), own),  # out of range
            (key, dict(base, fp="another list", claims=[dict(e=0, i=0, t=0.0)]), own),  # other shard list
            (metrics_key(run_id), {"peer": 5}, own),  # malformed metrics
            (metrics_key(run_id), partial(_oversized_metrics), own),  # oversized metrics
            (key, partial(_oversized, base), own),  # oversized
        ]
        stored = _store_all(hostile, stores, now + 600)
        seen = [swarm[1].get(key, latest=True), swarm[2].get(key, latest=True)]
        metrics_seen = swarm[1].get(metrics_key(run_id), latest=True)
        busy = max(_read_seconds(dht, key) for dht in swarm[1:])
        assert honest.join(timeout=60), "the epoch did not complete"
        assert not honest.errors, honest.errors
        malformed = [a.malformed for a in honest.assigners]
    finally:
        honest.close()
        if hostile.is_alive():
            hostile.shutdown()
    counts = reads_per_shard(read_logs(*honest.dirs))
    lost = len({(0, s) for s in shards} - set(counts)) + sum(n - 1 for n in counts.values())
    print(
        f"malformed records counted: {malformed}; a read of the run's records: {quiet:.2f} s, {busy:.2f} s under attack"
    )
    largest = max(
        len(MSGPackSerializer.dumps(r.value)) for v in seen if v is not None for r in v.value.values()
    )
    print(f"stores the swarm took: {stored}; largest record an honest peer read: {largest} bytes")
    fault.once(lost)
    assert lost == 0
    assert largest < ShardKeysValidator.MAX_BYTES, "an oversized record reached an honest peer"
    assert metrics_seen is None or not metrics_seen.value, f"bad metrics records were kept: {metrics_seen}"
    assert busy < 0.5, f"an oversized record slows every read: {busy:.2f} s"
