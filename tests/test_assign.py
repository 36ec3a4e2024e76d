"""assign.py without a DHT: the pure decision logic, record parsing, and the single-peer assigner."""

from __future__ import annotations

import json
import logging
import random
import time

import pytest
from hivemind.utils import ValueWithExpiration

from hivetrain.assign import Claim, ShardAssigner
from hivetrain.assign.observer import BoardObserver
from hivetrain.assign.store import Records
from hivetrain.leases import (
    Board,
    Done,
    Lease,
    Position,
    bucket_state,
    choose,
    confirmed,
    current_epoch,
    front,
    late_after,
    parse_records,
    plan_views,
    position,
    shard_list_fingerprint,
    shard_order,
    stragglers,
)

NOW = 1_000_000.0
A, B, C = b"[owner:a]", b"[owner:b]", b"[owner:c]"
NAMES = [f"train-{i:06d}.tar" for i in range(12)]


def lease(owner, *claims, expires=NOW + 10):
    return Lease(owner, owner.decode(), expires, tuple(claims))


def done(owner, complete=-1, **per_epoch):
    return Done(owner, owner.decode(), complete, {int(e[1:]): frozenset(s) for e, s in per_epoch.items()})


def identity(epoch):
    return list(range(12))


def picks(board, runs=200, **kw):
    return {choose(board, identity, rng=random.Random(k), spread=12, **kw).index for k in range(runs)}


def test_shard_order_is_agreed_and_reshuffled_each_epoch():
    orders = [shard_order("run", 0, e, 100) for e in range(3)]
    assert all(sorted(o) == list(range(100)) for o in orders)
    assert orders[0] == shard_order("run", 0, 0, 100)  # every peer computes the same order
    assert len({tuple(o) for o in orders}) == 3  # a new order each epoch
    assert shard_order("run", 1, 0, 100) != orders[0]
    assert shard_order("other", 0, 0, 100) != orders[0]


def test_free_shards_exclude_done_and_live_claims_but_not_expired_ones():
    board = Board(
        12,
        NOW,
        leases=(lease(A, (0, 2, NOW - 1)), lease(B, (0, 3, NOW - 5), expires=NOW - 0.1)),
        dones=(done(C, e0={0, 1}),),
    )
    chosen = picks(board)
    assert chosen == set(range(3, 12))  # 3 is free again: B's lease expired
    assert set(board.holders(0)) == {2}


def test_spread_limits_the_choice_to_the_first_free_shards_in_order():
    board = Board(12, NOW, dones=(done(C, e0={0, 1}),))
    chosen = {choose(board, identity, rng=random.Random(k), spread=3).index for k in range(100)}
    assert chosen == {2, 3, 4}
    assert {choose(board, identity, rng=random.Random(k), spread=1).index for k in range(10)} == {2}


def test_earliest_claim_wins_then_the_lower_key():
    board = Board(12, NOW, leases=(lease(B, (0, 5, NOW - 2.0)), lease(A, (0, 5, NOW - 1.0))))
    assert board.holders(0)[5][1] == B
    assert confirmed(board, B, 0, 5) and not confirmed(board, A, 0, 5)
    tie = Board(12, NOW, leases=(lease(B, (0, 5, NOW - 1.0)), lease(A, (0, 5, NOW - 1.0))))
    assert confirmed(tie, A, 0, 5) and not confirmed(tie, B, 0, 5)
    finished = Board(12, NOW, leases=tie.leases, dones=(done(C, e0={5}),))
    assert not confirmed(finished, A, 0, 5)  # read by someone already: back off


def test_current_epoch_follows_markers_and_full_epochs_not_stale_records():
    assert current_epoch(Board(12, NOW)) == 0
    # a long-gone peer's record of epoch 1 must not pull the run back
    stale = done(C, complete=0, e1={0, 1})
    assert current_epoch(Board(12, NOW, dones=(stale, done(A, complete=4)))) == 5
    # an epoch that the union of done records covers is complete even before anyone says so
    split = (done(A, complete=1, e2=set(range(6))), done(B, complete=1, e2=set(range(6, 12))))
    assert current_epoch(Board(12, NOW, dones=split)) == 3


def test_next_epoch_opens_when_no_shard_is_free_and_old_leases_come_first():
    in_flight = lease(A, (0, 11, NOW - 1))
    board = Board(12, NOW, leases=(in_flight,), dones=(done(B, e0=set(range(11))),))
    step = choose(board, identity, rng=random.Random(0))
    assert (step.kind, step.epoch) == ("claim", 1)  # no idling while shard 11 of epoch 0 is read
    # the next epoch also fully held: wait, do not open a third one
    busy = lease(C, *((1, i, NOW - 1) for i in range(12)))
    waiting = Board(12, NOW, leases=(in_flight, busy), dones=board.dones)
    assert choose(waiting, identity, rng=random.Random(0)).kind == "wait"
    # A dies: its epoch-0 shard is taken before anything of epoch 1
    dead = lease(A, (0, 11, NOW - 40), expires=NOW - 1)
    board = Board(12, NOW, leases=(dead,), dones=board.dones)
    step = choose(board, identity, rng=random.Random(0))
    assert (step.kind, step.epoch, step.index) == ("claim", 0, 11)


def test_a_straggler_at_the_epoch_end_gets_one_backup_reader_before_the_next_epoch():
    slow = lease(B, (0, 10, NOW - 30), (0, 11, NOW - 2))
    board = Board(12, NOW, leases=(slow,), dones=(done(A, e0=set(range(10))),))
    assert stragglers(board, 0, late_s=5) == [10] and stragglers(board, 0, late_s=5, me=B) == []
    step = choose(board, identity, rng=random.Random(0), me=A, late_s=5)
    assert (step.kind, step.epoch, step.index, step.backup) == ("claim", 0, 10, True)
    assert choose(board, identity, rng=random.Random(0), me=A).epoch == 1  # no late_s: no backups
    assert choose(board, identity, rng=random.Random(0), me=B, late_s=5).epoch == 1  # never one's own
    backed = Board(
        12, NOW, leases=(slow, lease(A, (0, 10, NOW)), lease(C, (0, 10, NOW + 0.1))), dones=board.dones
    )
    assert confirmed(backed, A, 0, 10, backup=True) and not confirmed(backed, A, 0, 10)
    assert not confirmed(backed, C, 0, 10, backup=True)  # one backup reader, not two
    assert stragglers(backed, 0, late_s=5) == []
    # while the oldest epoch still has free shards, nobody is backed up
    early = Board(12, NOW, leases=(slow,), dones=(done(A, e0=set(range(9))),))
    assert choose(early, identity, rng=random.Random(0), me=A, late_s=5) == choose(
        early, identity, rng=random.Random(0)
    )
    assert late_after([1.0, 2.0]) is None and late_after([1.0, 9.0, 2.0, 3.0]) == 9.0
    assert late_after([1.0, 9.0, 2.0, 3.0], least_s=15.0) == 15.0


def test_a_bucket_is_complete_open_or_exhausted_and_a_round_reads_the_right_ones():
    held = Board(12, NOW, leases=(lease(B, (0, 4, NOW - 30)),), dones=(done(A, e0={0, 1, 2, 3, 5}),))
    assert bucket_state(held, 0, [0, 1, 2, 3]) == "complete"
    assert bucket_state(held, 0, [3, 4, 5, 6]) == "open"  # 6 is free
    assert bucket_state(held, 0, [3, 4, 5]) == "exhausted"  # 4 is held
    assert bucket_state(held, 0, [3, 4, 5], late_s=5) == "open"  # ... by a straggler, who may be backed up
    assert bucket_state(held, 0, [3, 4, 5], late_s=5, me=B) == "exhausted"  # not by itself
    rng, kw = random.Random(0), dict(now=10.0, recheck_s=5.0)
    assert plan_views([0, 1], 4, {}, {}, rng=rng, spread=1, **kw) == [(0, 0)]  # alone: the order exactly
    complete, exhausted = {0: {0}}, {0: {1: 9.0}}
    targets = {plan_views([0, 1], 4, complete, exhausted, rng=rng, spread=2, **kw)[-1] for _ in range(50)}
    assert targets == {(0, 2), (0, 3)}  # the first `spread` open buckets of the oldest epoch
    assert plan_views([0, 1], 4, complete, exhausted, rng=rng, spread=1, stay=(0, 3), **kw) == [(0, 3)]
    assert plan_views([0, 1], 4, complete, exhausted, rng=rng, spread=1, stay=(0, 1), **kw) == [(0, 2)]
    # a bucket found exhausted over `recheck_s` ago is read first (lapsed claims show there)
    assert plan_views([0, 1], 4, complete, {0: {1: 1.0}}, rng=rng, spread=1, **kw) == [(0, 1), (0, 2)]
    assert plan_views([0, 1], 2, complete, exhausted, rng=rng, spread=1, **kw) == [(1, 0)]  # the next epoch
    assert plan_views([0], 2, complete, exhausted, rng=rng, spread=1, **kw) == []  # nothing until a recheck
    assert [front(p) for p in (1, 4, 5, 64, 1000)] == [1, 1, 2, 16, 250]


def test_the_observer_times_each_claim_of_others_once_from_sighting_to_done():
    observer = BoardObserver("r", NAMES, max_hold_s=1800)

    def see(*leases_, dones=()):
        board = Board(12, NOW, tuple(observer.unabandoned(x) for x in leases_), dones)
        observer.see(board, Records(leases_, dones), owner=A, reachable=True)

    slow = lease(B, (0, 3, NOW - 1), (0, 4, NOW - 1))
    see(slow)
    time.sleep(0.2)
    see(slow, dones=(done(C, e0={3}),))  # shard 3 finished by a backup reader; B still holds its claim
    see(slow, dones=(done(C, e0={3}),))
    assert len(observer.hold_s) == 1 and observer.hold_s[0] >= 0.2


def test_finished_after_max_epochs():
    board = Board(12, NOW, dones=(done(A, complete=1),))
    assert choose(board, identity, rng=random.Random(0), max_epochs=2).kind == "finished"
    last = Board(
        12, NOW, leases=(lease(A, (1, 3, NOW)),), dones=(done(B, complete=0, e1=set(range(12)) - {3}),)
    )
    assert choose(last, identity, rng=random.Random(0), max_epochs=2).kind == "wait"  # epoch 2 never opens


def test_position_is_the_current_epoch_and_what_is_done_of_the_open_ones():
    assert position(Board(12, NOW)) == Position(0, {})
    split = (done(A, complete=1, e2={0, 1}, e3={5}), done(B, complete=1, e2={7}, e1=set(range(12))))
    assert position(Board(12, NOW, dones=split)) == Position(2, {2: frozenset({0, 1, 7}), 3: frozenset({5})})
    claimed = Board(12, NOW, leases=(lease(A, (2, 4, NOW)),), dones=split)
    assert position(claimed) == position(Board(12, NOW, dones=split))  # a claim is not done


def test_a_resumed_position_is_not_read_again_and_the_orders_go_on(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hivetrain.assign")
    order = [NAMES[i] for i in shard_order("solo", 7, 3, len(NAMES))]
    saved = Position(
        3, {3: frozenset(NAMES.index(s) for s in order[:5]), 4: frozenset({NAMES.index("train-000002.tar")})}
    )
    assigner = ShardAssigner(NAMES, dht=None, run_id="solo", seed=7, max_epochs=5, resume=saved).start()
    assert assigner.epoch == 3 and "epoch 3 with 5 of 12 shards done" in caplog.text
    assert assigner.position() == saved
    claims = []
    while (claim := assigner.next_claim(timeout=5)) is not None:
        claims.append(claim)
        assigner.complete(claim, samples=1)
    assigner.close()
    assert [c.shard for c in claims if c.epoch == 3] == order[5:]  # the rest of epoch 3, in its order
    assert [c.shard for c in claims if c.epoch == 4] == [
        NAMES[i] for i in shard_order("solo", 7, 4, 12) if i != 2
    ]
    assert {c.epoch for c in claims} == {3, 4}


def test_parsing_ignores_and_reports_records_that_make_no_sense():
    fp = shard_list_fingerprint(NAMES)
    good = dict(
        peer="p",
        fp=fp,
        time=NOW,
        lease_until=NOW + 30,
        claims=[dict(e=1, i=3, t=NOW)],
        complete=-1,
        done=[dict(e=0, shards=[1, 2])],
    )
    entries = {
        A: good,
        B: dict(good, claims=[dict(e=0, i=99, t=NOW)]),  # there is no shard 99
        C: dict(good, done=[dict(e=0, shards=[12])]),
        b"[owner:d]": dict(good, fp="another manifest"),
        b"[owner:e]": dict(good, claims=[dict(e=0, i=1, t=NOW + 3600)]),  # from the future
        b"[owner:f]": b"garbage",
        b"[owner:g]": dict(good, time=1),  # an int: no silent conversion
        b"[owner:h]": dict(good, complete="x"),
        b"[owner:i]": {k: v for k, v in good.items() if k != "claims"},
    }
    value = ValueWithExpiration({k: ValueWithExpiration(v, NOW + 10) for k, v in entries.items()}, NOW + 10)
    leases, dones, bad = parse_records(value, n=12, fp=fp, now=NOW)
    assert leases == [Lease(A, "p", NOW + 30, ((1, 3, NOW),), NOW)]
    assert dones == [Done(A, "p", -1, {0: frozenset({1, 2})})]
    assert sorted(subkey for subkey, _ in bad) == sorted(set(entries) - {A})
    assert parse_records(None, n=12, fp=fp, now=NOW) == ([], [], [])


def test_alone_without_dht_reads_every_shard_once_per_epoch_in_order(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hivetrain.assign")
    assigner = ShardAssigner(NAMES, dht=None, run_id="solo", seed=7, log_dir=tmp_path, max_epochs=2).start()
    assert assigner.single_peer and "single-peer mode" in caplog.text
    claims = []
    while (claim := assigner.next_claim(timeout=5)) is not None:
        claims.append(claim)
        assigner.complete(claim, samples=10 + len(claims))
    assigner.close()
    for epoch in (0, 1):
        got = [c.shard for c in claims if c.epoch == epoch]
        assert got == [NAMES[i] for i in shard_order("solo", 7, epoch, len(NAMES))]
    assert assigner.epoch == 2
    lines = [json.loads(line) for line in (tmp_path / "shards.jsonl").read_text().splitlines()]
    assert [(x["epoch"], x["shard"]) for x in lines] == [(c.epoch, c.shard) for c in claims]
    assert [x["samples"] for x in lines] == list(range(11, 11 + len(claims)))
    assert all(x["start"] <= x["end"] <= time.time() and x["peer"] == "local" for x in lines)


def test_prefetch_release_and_close_without_dht(tmp_path, caplog):
    assigner = ShardAssigner(NAMES[:3], dht=None, run_id="solo", max_epochs=1).start()
    first, second, third = (assigner.next_claim(timeout=1) for _ in range(3))
    assert assigner.held() == [first, second, third]
    started = time.monotonic()
    assert assigner.next_claim(timeout=0.3) is None  # all three in flight here: waits, then gives up
    assert time.monotonic() - started >= 0.3
    assigner.release(second)
    assert assigner.next_claim(timeout=1) == second  # given back, so free again
    assigner.complete(first, 5)
    with pytest.raises(ValueError, match="not held"):
        assigner.complete(first, 5)
    state = assigner.epoch_state()
    assert state[first.shard] == {"state": "done", "holder": "local"}
    assert state[third.shard]["state"] == "claimed"
    assigner.close()
    assert assigner.held() == [] and assigner.next_claim(timeout=1) is None
    assigner.complete(third, 5)  # a reader that finishes after close(): told, not raised
    assert "finished after close(): not recorded" in caplog.text


def test_claims_in_batches_are_handed_out_one_at_a_time():
    assigner = ShardAssigner(NAMES, dht=None, run_id="solo", max_epochs=1, batch=4).start()
    order = [NAMES[i] for i in shard_order("solo", 0, 0, len(NAMES))]
    first = assigner.next_claim(timeout=1)
    assert first.shard == order[0] and assigner.held() == [first]  # three more wait in reserve
    assert assigner.epoch_state()[order[3]]["state"] == "claimed"
    rest = [assigner.next_claim(timeout=1) for _ in range(len(NAMES) - 1)]
    assert [c.shard for c in [first, *rest]] == order
    assert assigner.next_claim(timeout=0.1) is None
    assigner.close()


def test_nothing_happens_until_start(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hivetrain.assign")
    assigner = ShardAssigner(NAMES, dht=None, run_id="solo", log_dir=tmp_path / "logs", max_epochs=1)
    assert not (tmp_path / "logs").exists() and "single-peer mode" not in caplog.text
    with pytest.raises(RuntimeError, match="start"):
        assigner.next_claim(timeout=1)
    with assigner:  # entering starts it
        assert "single-peer mode" in caplog.text and assigner.single_peer and assigner.epoch == 0
        assigner.complete(assigner.next_claim(timeout=1), samples=1)
    assert len((tmp_path / "logs" / "shards.jsonl").read_text().splitlines()) == 1
    with pytest.raises(RuntimeError, match="closed"):
        assigner.start()


def test_bad_arguments():
    with pytest.raises(ValueError, match="no shards"):
        ShardAssigner([], dht=None, run_id="r")
    with pytest.raises(ValueError, match="unique"):
        ShardAssigner(["a.tar", "a.tar"], dht=None, run_id="r")
    with pytest.raises(ValueError, match="lease_s"):
        ShardAssigner(["a.tar"], dht=None, run_id="r", lease_s=0)
    with pytest.raises(ValueError, match="batch"):
        ShardAssigner(["a.tar"], dht=None, run_id="r", batch=0)
    assert Claim(0, "a.tar") == Claim(0, "a.tar")
