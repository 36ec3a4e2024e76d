"""The pure decisions of a DiLoCo round (hivetrain.sync.rounds), without a DHT."""

from __future__ import annotations

import pytest

from hivetrain.sync import rounds
from hivetrain.sync.rounds import Gathered, after_round, global_step, next_lineage, sharing_priority

L0 = 0
L1 = next_lineage(L0, 0)


def member(version, lineage, samples, total):
    return dict(version=version, lineage=lineage, samples=samples, total=total)


def decide(gathered, *, version=1, lineage=L1, total=1000, samples=100, peers=3, peer_id="me"):
    return after_round(
        version=version, lineage=lineage, total=total, samples=samples, gathered=gathered, peers=peers,
        peer_id=peer_id,
    )  # fmt: skip


def test_members_in_step_apply_and_count_every_sample():
    gathered = {"me": member(1, L1, 100, 1000), "b": member(1, L1, 300, 1000), "c": member(1, L1, 50, 1000)}
    out = decide(gathered)
    assert (out.action, out.version, out.total, out.members) == ("apply", 2, 1450, 3)
    assert out.lineage == next_lineage(L1, 1)
    # every member decides alike: the same version, lineage and count
    other = decide(gathered, samples=300, peer_id="b")
    assert (other.action, other.version, other.lineage, other.total) == ("apply", 2, out.lineage, 1450)


def test_a_member_behind_loads_the_run_state_instead_of_stepping():
    gathered = {"me": member(1, L1, 100, 1000), "b": member(3, 77, 300, 5000)}
    out = decide(gathered)
    # it learns where the round took the run, and from where (to replay the step on a download)
    assert (out.action, out.base_version, out.base_lineage) == ("load", 3, 77)
    ahead = decide(gathered, version=3, lineage=77, total=5000, samples=300, peer_id="b")
    assert (ahead.action, ahead.version, ahead.total) == ("apply", 4, 5400)
    assert (out.version, out.lineage, out.total) == (ahead.version, ahead.lineage, ahead.total)


def test_the_state_with_more_samples_wins_over_more_steps_taken_alone():
    """A peer cut off for a while stepped alone more often (version 9) than the group that trained on
    (version 6), but on fewer samples: it takes the group's state, the group keeps its own."""
    gathered = {"me": member(9, 5, 10, 2_000), "b": member(6, 8, 10, 4_000), "c": member(6, 8, 10, 4_000)}
    cut_off = decide(gathered, version=9, lineage=5, total=2_000, samples=10)
    assert (cut_off.action, cut_off.base_version, cut_off.base_lineage) == ("load", 6, 8)
    group = decide(gathered, version=6, lineage=8, total=4_000, samples=10, peer_id="b")
    assert (group.action, group.version, group.total) == ("apply", 7, 4_030)
    assert (cut_off.version, cut_off.lineage) == (group.version, group.lineage)


def test_peers_that_stepped_apart_with_equal_samples_are_told_apart():
    """Two peers that each stepped alone (a partition) on as many samples end on different parameters:
    the smaller lineage wins, the other reloads; state downloads prefer the winner."""
    mine, theirs = next_lineage(L1, 1, alone="me"), next_lineage(L1, 1, alone="b")
    assert mine != theirs
    gathered = {"me": member(2, mine, 10, 900), "b": member(2, theirs, 10, 900)}
    winner, loser = sorted([mine, theirs])
    assert decide(gathered, version=2, lineage=winner, total=900).action == "apply"
    assert decide(gathered, version=2, lineage=loser, total=900).action == "load"
    assert sharing_priority(900, winner) > sharing_priority(900, loser) > sharing_priority(899, 0)


def test_failed_round_alone_steps_alone_and_with_others_skips():
    alone = decide(None, peers=1)
    assert (alone.action, alone.version, alone.total) == ("apply-alone", 2, 1100)
    assert alone.lineage == next_lineage(L1, 1, alone="me") != next_lineage(L1, 1)
    skip = decide(None, peers=4)
    assert (skip.action, skip.version, skip.lineage, skip.total) == ("skip", 1, L1, 1000)


@pytest.mark.parametrize(
    "bad",
    [None, "text", {"version": 1}, member(-1, 0, 1, 1), member(1, 0, True, 1), member(1, 2**32, 1, 1),
     member(1.5, 0, 1, 1)],
)  # fmt: skip
def test_nonsense_from_a_member_is_ignored(bad):
    assert Gathered.of(bad) is None
    out = decide({"me": member(1, L1, 100, 1000), "x": bad})
    assert (out.action, out.total, out.members) == ("apply", 1100, 1)


def test_global_step_counts_agreed_samples_and_extrapolates_this_peers_pace():
    assert global_step(total=1024, local_since=0, peers=4, target_global_bsz=256) == 4
    assert global_step(total=1024, local_since=64, peers=4, target_global_bsz=256) == 5
    assert global_step(total=0, local_since=300, peers=0, target_global_bsz=256) == 1


def test_round_timing_follows_the_measured_rounds():
    t = rounds.RoundTiming(least_s=2, most_s=30, least_timeout_s=30)
    assert t.matchmaking_s(None, 15.0) == 15.0  # nothing measured yet: the configured time
    assert t.matchmaking_s(60.0, 15.0) == 12.0
    assert t.matchmaking_s(2.0, 15.0) == 2.0 and t.matchmaking_s(900.0, 15.0) == 30.0
    assert t.timeout_s([], 5.0, 60.0) == 60.0
    assert t.timeout_s([4.0, 20.0], 5.0, 60.0) == 65.0
    assert t.timeout_s([1.0], 2.0, 60.0) == 30.0


def test_default_local_steps_give_about_forty_rounds_within_bounds():
    assert rounds.default_local_steps(112_000) == 128  # ImageNet, 90 epochs at a global batch of 1024
    assert rounds.default_local_steps(2_000) == 50
    assert rounds.default_local_steps(70) == 8  # the demo


def recorded(*bases):
    """The outcomes a loading peer recorded for rounds that stepped from these (version, lineage)s."""
    return [rounds.Outcome("load", v + 1, next_lineage(lin, v), 0, 2, v, lin) for v, lin in bases]


def test_a_download_behind_the_run_is_brought_forward_by_the_rounds_recorded_meanwhile():
    L2 = next_lineage(L1, 1)
    L3 = next_lineage(L2, 2)
    steps = recorded((1, L1), (2, L2), (3, L3))
    # the download is of version 1 (it began before the first recorded round landed): all three apply
    assert rounds.replay(1, L1, steps) == steps
    # of version 2: the first is already in it
    assert rounds.replay(2, L2, steps) == steps[1:]
    # newer than every recorded round: nothing to apply, in step already
    assert rounds.replay(4, next_lineage(L3, 3), steps) == []
    assert rounds.replay(1, L1, []) == []


def test_recorded_rounds_that_do_not_chain_on_from_the_download_mean_downloading_again():
    L2 = next_lineage(L1, 1)
    assert rounds.replay(1, L1, recorded((2, L2))) is None  # the round from 1 to 2 was missed
    assert rounds.replay(1, 99, recorded((1, L1))) is None  # the download is of another lineage
    assert rounds.replay(1, L1, recorded((1, L1), (3, 5))) is None  # a gap after the first


def test_a_round_that_one_member_began_as_the_last_is_the_last_for_all():
    gathered = {"me": member(4, L1, 10, 900), "b": dict(member(4, L1, 30, 900), final=True)}
    assert rounds.is_last_round(gathered)
    assert not rounds.is_last_round(
        {"me": member(4, L1, 10, 900), "b": dict(member(4, L1, 30, 900), final=False)}
    )
    assert not rounds.is_last_round(
        {"me": member(4, L1, 10, 900), "b": dict(member(4, L1, 30, 900), final=1)}
    )
