"""ShardAssigner over real hivemind DHTs on 127.0.0.1: the six properties of dividing shards among peers.

A fake consumer stands in for the model: it claims shards (optionally a few ahead, as the data plane
prefetches), "reads" each for a set time and completes it. Coverage is checked from the peers' own
`shards.jsonl` logs. Run as `python -m tests.test_assign_dht peer ...` this module is also the peer that
one test kills with SIGKILL.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from hivetrain.assign import LeaseTiming, ShardAssigner
from hivetrain.dht import (
    add_epoch_keys,
    bucket_key,
    ensure_run_validators,
    make_dht,
    signing_key,
    visible_addresses,
)
from hivetrain.leases import Position, shard_list_fingerprint, shard_order
from tests.util import REPO, loopback_dhts, wait_until

FAST = LeaseTiming(settle_s=0.05, poll_s=0.05, request_timeout_s=5)


def names(n: int) -> list[str]:
    return [f"train-{i:06d}.tar" for i in range(n)]


def consume(assigner: ShardAssigner, read_s: float, *, prefetch: int = 1, claims_log: Path | None = None):
    """The fake model: keep up to `prefetch` claims, read each for `read_s`, complete it; until None. As
    `hivetrain.feed` does, a claim that another peer took over before its reading began is given back."""
    slots, claims = threading.Semaphore(prefetch), queue.Queue()

    def claimer():
        while True:
            slots.acquire()
            claim = assigner.next_claim(timeout=60)
            if claim is not None and claims_log is not None:
                with claims_log.open("a") as f:
                    f.write(json.dumps(dict(epoch=claim.epoch, shard=claim.shard, t=time.time())) + "\n")
            claims.put(claim)
            if claim is None:
                return

    thread = threading.Thread(target=claimer, daemon=True)
    thread.start()
    done = []
    while (claim := claims.get()) is not None:
        if assigner.taken_elsewhere(claim):
            assigner.release(claim)
            slots.release()
            continue
        time.sleep(read_s)  # stands for reading the shard
        assigner.complete(claim, samples=1)
        done.append(claim)
        slots.release()
    thread.join()
    return done


def in_threads(*jobs):
    """Run callables in threads; re-raise the first failure."""
    errors = []

    def wrap(job):
        try:
            job()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]


def read_logs(*dirs: Path) -> list[dict]:
    lines = []
    for d in dirs:
        path = d / "shards.jsonl"
        if path.exists():
            lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def reads_per_shard(lines):
    return collections.Counter((x["epoch"], x["shard"]) for x in lines)


@pytest.fixture(scope="module")
def swarm():
    """Four DHT peers on loopback, each with its own signing key, shared by the tests of this module."""
    with loopback_dhts(4) as peers:
        yield peers


@pytest.fixture
def run_id(request, swarm):
    """A fresh run per test; every swarm node validates its records, as peers of one run do."""
    run = f"t{os.getpid()}_{request.node.name}"
    for dht in swarm:
        ensure_run_validators(dht, run)
        add_epoch_keys(dht, run, range(4), buckets=1)  # each test's epochs have one bucket
    return run


@pytest.fixture
def peer(run_id, tmp_path):
    """Makes ShardAssigners for this test's run (logging to tmp_path/<log>), closed when the test ends."""
    made = []

    def make(dht, log: str | None = None, **kw):
        kw = dict(dict(run_id=run_id, lease_s=5, timing=FAST), **kw)
        made.append(ShardAssigner(kw.pop("shards"), dht=dht, log_dir=log and tmp_path / log, **kw).start())
        return made[-1]

    yield make
    for assigner in made:
        assigner.close()


def test_a_peer_publishes_nothing_until_it_claims(swarm, run_id):
    key = bucket_key(run_id, 0, 0)  # four shards: one bucket
    assigner = ShardAssigner(names(4), dht=swarm[0], run_id=run_id, timing=FAST)
    try:
        assigner.start()
        assert swarm[1].get(key, latest=True) is None
        claim = assigner.next_claim(timeout=10)
        record = wait_until(
            lambda: (v := swarm[1].get(key, latest=True)) and v.value.get(signing_key(swarm[0])),
            what="the claiming peer's record",
        )
        assert record.value["peer"] == assigner.peer_id
        assert [names(4)[c["i"]] for c in record.value["claims"]] == [claim.shard]
    finally:
        assigner.close()


def test_shards_finished_just_before_their_epoch_is_left_behind_stay_done_in_the_dht(swarm, run_id, peer):
    # the renewal thread is slow here, so the next claim round is the first write of these done shards,
    # and its read has already moved the peer two epochs on (past the point where it forgets epoch 0)
    shards, key = names(4), bucket_key(run_id, 0, 0)
    slow = LeaseTiming(settle_s=0.05, poll_s=30, request_timeout_s=5)
    assigner = peer(swarm[0], shards=shards, lease_s=90, timing=slow, batch=8)
    held = [assigner.next_claim(timeout=10) for _ in range(8)]  # every shard of epochs 0 and 1
    assert sorted((c.epoch, c.shard) for c in held) == [(e, s) for e in (0, 1) for s in shards]
    for claim in held:
        assigner.complete(claim, samples=1)
    assert assigner.next_claim(timeout=10).epoch == 2

    def done_in_epoch_0():
        value = swarm[1].get(key, latest=True)
        record = value and value.value.get(signing_key(swarm[0]))
        return record and {i for d in record.value["done"] for i in d["shards"] if d["e"] == 0}

    assert done_in_epoch_0() == {0, 1, 2, 3}, "the record of epoch 0 lost its done shards"


def test_stable_peers_read_each_shard_once_per_epoch_in_the_agreed_order(swarm, run_id, peer, tmp_path):
    shards, peers = names(30), swarm[:3]
    # the last one claims two shards per round
    assigners = [peer(d, str(k), shards=shards, max_epochs=2, batch=1 + k // 2) for k, d in enumerate(peers)]
    in_threads(*(lambda a=a: consume(a, 0.02, prefetch=2) for a in assigners))
    lines = read_logs(*(tmp_path / str(k) for k in range(3)))
    assert reads_per_shard(lines) == {(e, s): 1 for e in (0, 1) for s in shards}
    per_peer = collections.Counter(x["peer"] for x in lines)
    assert len(per_peer) == 3 and min(per_peer.values()) >= 5, per_peer
    assert all(a.epoch == 2 and a.next_claim(timeout=1) is None for a in assigners)
    for epoch in (0, 1):
        # claims follow the epoch's seeded order, up to the random spread among the first free shards
        order = shard_order(run_id, 0, epoch, len(shards))
        claimed = [x["shard"] for x in sorted(lines, key=lambda x: x["start"]) if x["epoch"] == epoch]
        lag = max(order.index(shards.index(name)) - rank for rank, name in enumerate(claimed))
        assert lag <= 12, (epoch, lag)
    assert shard_order(run_id, 0, 0, 30) != shard_order(run_id, 0, 1, 30)


def test_killed_peer_loses_nothing(swarm, run_id, peer, tmp_path, children):
    shards, lease_s = names(24), 2.0
    dead_dir = tmp_path / "dead"
    doomed = children.start(
        sys.executable,
        "-m",
        "tests.test_assign_dht",
        "peer",
        "--initial-peer",
        visible_addresses(swarm[0])[0],
        "--run-id",
        run_id,
        "--shards",
        "24",
        "--lease",
        str(lease_s),
        "--read",
        "0.3",
        "--prefetch",
        "2",
        "--log-dir",
        str(dead_dir),
        cwd=REPO,
    )

    def finished_two_and_holds_more():
        claims = dead_dir / "claims.jsonl"
        done = len(read_logs(dead_dir))
        return done >= 2 and claims.exists() and len(claims.read_text().splitlines()) > done

    # let it finish a few shards while it holds more, then kill it without warning
    wait_until(
        finished_two_and_holds_more, timeout=60, what="the doomed peer to finish 2 shards and hold more"
    )
    os.killpg(doomed.pid, signal.SIGKILL)  # the whole peer: its DHT process and p2p daemon too
    killed_at = time.time()
    doomed.wait(timeout=10)
    finished = {x["shard"] for x in read_logs(dead_dir)}
    claimed = {json.loads(line)["shard"] for line in (dead_dir / "claims.jsonl").read_text().splitlines()}
    in_flight = claimed - finished
    assert in_flight, "the killed peer held no claims"

    survivors = [
        peer(d, str(k), shards=shards, lease_s=lease_s, max_epochs=1) for k, d in enumerate(swarm[:2])
    ]
    in_threads(*(lambda a=a: consume(a, 0.05) for a in survivors))
    lines = read_logs(dead_dir, tmp_path / "0", tmp_path / "1")
    counts = reads_per_shard(lines)
    assert set(counts) == {(0, s) for s in shards}  # nothing lost
    assert sum(counts.values()) - len(shards) <= len(in_flight)  # duplicates bounded by shards in flight
    taken_over = [x for x in read_logs(tmp_path / "0", tmp_path / "1") if x["shard"] in in_flight]
    assert {x["shard"] for x in taken_over} == in_flight
    assert max(x["start"] for x in taken_over) <= killed_at + lease_s + 3.0  # once its lease ran out


def test_peer_joining_mid_run_gets_work_at_the_current_epoch(swarm, run_id, peer, tmp_path):
    shards = names(24)
    early = [peer(d, str(k), shards=shards, max_epochs=3) for k, d in enumerate(swarm[:2])]
    joined = {}

    def join():
        wait_until(
            lambda: sum(x["epoch"] == 1 for x in read_logs(tmp_path / "0", tmp_path / "1")) >= 5,
            timeout=60,
            what="epoch 1 to be under way",
        )
        dht = make_dht(private_key=RSAPrivateKey(), run_id=run_id, initial_peers=visible_addresses(swarm[2]))
        try:
            started = time.monotonic()
            late = peer(dht, "late", shards=shards, max_epochs=3)
            first = late.next_claim(timeout=10)
            joined.update(first=first, wait=time.monotonic() - started, epoch=late.epoch)
            late.complete(first, samples=1)
            consume(late, 0.05)
            late.close()  # before its DHT goes
        finally:
            dht.shutdown()

    in_threads(join, *(lambda a=a: consume(a, 0.05) for a in early))
    assert joined["first"] is not None and joined["wait"] < 3.0, joined
    assert joined["first"].epoch >= 1 and joined["epoch"] >= 1  # learnt from the DHT, not epoch 0
    lines = read_logs(tmp_path / "0", tmp_path / "1", tmp_path / "late")
    assert reads_per_shard(lines) == {(e, s): 1 for e in range(3) for s in shards}
    assert sum(x["peer"] not in {a.peer_id for a in early} for x in lines) >= 3


def test_a_restarted_peer_keeps_its_finished_shards_and_a_live_run_overrides_a_checkpoint(
    swarm, run_id, peer, caplog
):
    caplog.set_level(logging.INFO, logger="hivetrain.assign")
    shards = names(8)
    first = peer(swarm[0], shards=shards)
    finished = [first.next_claim(timeout=10) for _ in range(3)]
    for claim in finished:
        first.complete(claim, samples=1)
    first.close()
    # the same node's key (a peer restarted with its --identity) with a checkpoint from elsewhere
    again = peer(swarm[0], shards=shards, max_epochs=1, resume=Position(5, {5: frozenset({0, 1})}))
    assert "the run's data position stands, not the checkpoint's" in caplog.text and again.epoch == 0
    rest = consume(again, 0.0)
    assert sorted(c.shard for c in rest) == sorted(set(shards) - {c.shard for c in finished})


def test_three_times_faster_peer_reads_about_three_times_more(swarm, run_id, peer, tmp_path):
    # the same settings for both; three shards claimed per round and held ahead keep claiming off the
    # critical path even on a loaded machine, as a prefetching data plane does
    shards = names(36)
    fast, slow = (
        peer(swarm[k], name, shards=shards, max_epochs=1, batch=3) for k, name in enumerate(("fast", "slow"))
    )
    in_threads(lambda: consume(fast, 0.3, prefetch=3), lambda: consume(slow, 0.9, prefetch=3))
    lines = read_logs(tmp_path / "fast", tmp_path / "slow")
    assert {x["shard"] for x in lines} == set(shards)
    assert len(lines) - 36 <= sum(bool(x.get("backup")) for x in lines) <= 3  # only stragglers read twice
    n_fast, n_slow = len(read_logs(tmp_path / "fast")), len(read_logs(tmp_path / "slow"))
    assert 2.0 <= n_fast / n_slow <= 4.5, (n_fast, n_slow)


def test_a_far_slower_peer_does_not_hold_up_the_end_of_an_epoch(swarm, run_id, peer, tmp_path):
    shards, read_fast, read_slow = names(24), 0.1, 9.0  # "late" is half a lease (2.5 s) here
    fast = [peer(swarm[k], f"fast{k}", shards=shards, max_epochs=1, batch=2) for k in (0, 1)]
    slow = peer(swarm[2], "slow", shards=shards, max_epochs=1, batch=2)
    jobs = [lambda a=a: consume(a, read_fast, prefetch=2) for a in fast]
    in_threads(*jobs, lambda: consume(slow, read_slow, prefetch=2))
    lines = sorted(
        read_logs(tmp_path / "fast0", tmp_path / "fast1", tmp_path / "slow"), key=lambda x: x["end"]
    )
    first = {}
    for x in lines:
        first.setdefault(x["shard"], x)
    assert set(first) == set(shards)
    ended = max(x["end"] for x in first.values())
    their_part = max(x["end"] for x in lines if x["peer"] != slow.peer_id and not x.get("backup"))
    backups = [x for x in lines if x.get("backup")]
    assert backups and all(x["peer"] != slow.peer_id for x in backups)
    # without backup readers the epoch would end when the slow peer had read what it holds (9 s or more)
    assert ended - their_part < read_slow / 3, (ended - their_part, lines)
    # the shard the slow peer was reading is read twice; the one it held ahead was stolen, read once
    assert len(lines) - len(shards) <= 1, lines


def test_hostile_peer_cannot_erase_forge_or_crash(swarm, run_id, peer, tmp_path):
    shards, key = names(16), bucket_key(run_id, 0, 0)
    honest = [peer(d, str(k), shards=shards, max_epochs=1) for k, d in enumerate(swarm[:2])]
    held = {a.next_claim(timeout=10): a for a in honest for _ in range(2)}
    victim = signing_key(swarm[0])
    # the hostile peer signs with its own key but validates nothing, so its own node keeps whatever it sends
    hostile = make_dht(private_key=RSAPrivateKey(), initial_peers=visible_addresses(swarm[3]))
    try:
        own, now = signing_key(hostile), get_dht_time()
        empty = dict(peer="x", fp="f", time=now, lease_until=now, claims=[], complete=5, done=[])
        # erase the victim's claims and skip epochs in its name: without its key, refused everywhere
        hostile.store(key, empty, now + 7200, subkey=victim)
        hostile.store(key, b"\x00garbage", now + 3600, subkey=own)  # wrong shape
        hostile.store(key, {"claims": "all of them"}, now + 3600, subkey=b"no owner")
        # well-formed and signed but nonsense: a shard that does not exist
        nonsense = dict(
            empty, fp=shard_list_fingerprint(shards), complete=-1, claims=[dict(e=0, i=999, t=now)]
        )
        hostile.store(key, dict(nonsense, lease_until=now + 60), now + 3600, subkey=own)

        for a in honest:
            state = a.epoch_state()
            for claim, owner in held.items():
                assert state[claim.shard] == {"state": "claimed", "holder": owner.peer_id}
            assert a.malformed == 1, (
                a._observer._malformed
            )  # the signed nonsense; the rest never got past the DHT's validators
        for claim, owner in held.items():
            owner.complete(claim, samples=1)
        in_threads(*(lambda a=a: consume(a, 0.02) for a in honest))
    finally:
        hostile.shutdown()
    lines = read_logs(tmp_path / "0", tmp_path / "1")
    assert reads_per_shard(lines) == {(0, s): 1 for s in shards}


def test_a_peer_whose_clock_is_ahead_is_reported(swarm, run_id, peer, caplog):
    shards = names(4)
    assigner = peer(swarm[0], shards=shards)
    now = get_dht_time()
    ahead = dict(peer="ahead", fp=shard_list_fingerprint(shards), time=now + 10, lease_until=now + 15)
    ahead.update(claims=[], complete=-1, done=[])
    assert swarm[1].store(bucket_key(run_id, 0, 0), ahead, now + 60, subkey=signing_key(swarm[1]))
    assigner.epoch_state()
    assert re.search(
        r"peer ahead wrote its record \+(9|10)\.\d s from our clock: synchronize clocks", caplog.text
    )
    assert not assigner.single_peer  # counted as a live peer all the same


def test_alone_then_unreachable_dht_still_covers_every_shard(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hivetrain.assign")
    shards = names(12)
    dht = make_dht(run_id="alone", private_key=RSAPrivateKey())
    assigner = ShardAssigner(
        shards, dht=dht, run_id="alone", lease_s=5, max_epochs=1, log_dir=tmp_path, timing=FAST
    ).start()
    try:
        assert assigner.single_peer
        assert "no other peer of this run is visible: reading every shard alone" in caplog.text
        for _ in range(4):
            assigner.complete(assigner.next_claim(timeout=5), samples=1)
        dht.shutdown()  # the DHT goes away under the assigner
        consume(assigner, 0.0)
    finally:
        assigner.close()
        dht.shutdown()
    assert "the DHT is unreachable" in caplog.text and assigner.single_peer
    assert reads_per_shard(read_logs(tmp_path)) == {(0, s): 1 for s in shards}


def _peer_main(argv: list[str]) -> None:
    """A peer in its own process (the one test_killed_peer_loses_nothing kills)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("peer")
    parser.add_argument("--initial-peer", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--lease", type=float, required=True)
    parser.add_argument("--read", type=float, required=True)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--log-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    dht = make_dht(run_id=args.run_id, initial_peers=[args.initial_peer])
    assigner = ShardAssigner(
        names(args.shards),
        dht=dht,
        run_id=args.run_id,
        lease_s=args.lease,
        max_epochs=1,
        log_dir=args.log_dir,
        timing=FAST,
    ).start()
    consume(assigner, args.read, prefetch=args.prefetch, claims_log=args.log_dir / "claims.jsonl")


if __name__ == "__main__":
    _peer_main(sys.argv[1:])
