"""The decisions of a DiLoCo round, pure: what a finished (or failed) round means for this peer's state,
where the run is in global steps, and how long to wait for partners.

No DHT and no torch here (`hivetrain.sync.diloco` does the averaging around these functions), so every
rule is tested on its own, like the lease decision in `hivetrain.leases`.

Every peer keeps a copy of the run's *global* parameters, counts the outer steps folded into them (its
`version`) and names their history (its `lineage`: a hash that every member of a round moves on alike,
and that a peer that stepped alone moves on with its own id, so that two peers which stepped apart are
told apart even at equal versions). A round averages the peers' pseudo-gradients; every member gathers
the others' versions, lineages and sample counts with the averaged tensors, so each one decides alike:

* the members holding the winning state, the one with the most samples behind it (then the smaller
  lineage), apply the outer step (`apply`) and count the round's samples;
* any other member (it missed a round: its link was down, it joined late, it stepped alone while cut
  off) keeps its local progress but takes the run's global state from a peer (`load`), instead of
  applying an outer step to parameters the others no longer have; state downloads prefer the same
  winner (`sharing_priority`). A peer cut off for a while and stepping alone thus rejoins the group,
  which trained more samples meanwhile, rather than overriding it;
* a download of the whole state can take longer than the time between two rounds (the model in fp32
  over a volunteer's link), so the state that lands is already behind. The loading peer keeps taking
  part in the rounds meanwhile, with no weight, and records each round's averaged step; once the
  download lands it applies the recorded steps that follow it (`replay`), and is in step with the run;
* a round that found no partner: alone in the run, the peer applies its own outer step (a lone DiLoCo
  peer is local SGD with an outer optimizer); with others around it keeps training and contributes its
  progress to the next round (`skip`), so nobody waits for anybody.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LINEAGE_BITS = 32


def next_lineage(lineage: int, version: int, *, alone: str | None = None) -> int:
    """The lineage after an outer step from `version`: the same for every member of a round; with
    `alone` (this peer's id) one of its own."""
    digest = hashlib.sha256(f"{lineage}:{version}:{alone or ''}".encode()).digest()
    return int.from_bytes(digest[: LINEAGE_BITS // 8], "big")


def sharing_priority(total: int, lineage: int) -> float:
    """The order in which peers are asked for state: most samples first, then the smallest lineage."""
    return total + 0.5 * (1.0 - lineage / 2**LINEAGE_BITS)


@dataclass(frozen=True)
class Gathered:
    """What one member of a round told the others: its version and lineage, samples since its last
    round, and the run's sample count as of its version."""

    version: int
    lineage: int
    samples: int
    total: int

    @classmethod
    def of(cls, value: object) -> Gathered | None:
        """Parse a member's gathered metadata; None when it makes no sense (a broken or hostile peer)."""
        if not isinstance(value, Mapping):
            return None
        try:
            numbers = tuple(value[k] for k in ("version", "lineage", "samples", "total"))
        except KeyError:
            return None
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in numbers):
            return None
        if numbers[1] >= 2**LINEAGE_BITS:
            return None
        return cls(*numbers)


@dataclass(frozen=True)
class Outcome:
    """What to do after a round: `apply` the averaged outer step, `load` the run's state from a peer,
    `apply-alone` (own pseudo-gradient, no partners), or `skip` (contribute to the next round)."""

    action: str
    version: int
    lineage: int
    total: int  # the run's samples once the outcome is carried out
    members: int = 1
    base_version: int | None = None  # `load`: the state the round's members in step stepped from
    base_lineage: int | None = None


def after_round(
    *,
    version: int,
    lineage: int,
    total: int,
    samples: int,
    gathered: Mapping[object, object] | None,
    peers: int,
    peer_id: str,
) -> Outcome:
    """Decide a round's outcome for this peer.

    Args:
        version, lineage, total, samples: this peer's version and lineage, the run's sample count as of
            its version, and its samples since its last round.
        gathered: every member's metadata (this peer's included) after a successful all-reduce; None
            when the round failed (no group, a timeout, a member that vanished mid-round).
        peers: training peers visible in the run now (this one included).
        peer_id: this peer's id (names a lineage of its own when it steps alone).
    """
    if gathered is None:
        if peers <= 1:
            return Outcome(
                "apply-alone", version + 1, next_lineage(lineage, version, alone=peer_id), total + samples
            )
        return Outcome("skip", version, lineage, total)
    members = [g for g in map(Gathered.of, gathered.values()) if g is not None]
    best = max([Gathered(version, lineage, samples, total), *members], key=lambda g: (g.total, -g.lineage))
    stepped = Outcome(
        "apply", best.version + 1, next_lineage(best.lineage, best.version),
        best.total + sum(g.samples for g in members), len(members), best.version, best.lineage,
    )  # fmt: skip
    if (version, lineage) != (best.version, best.lineage):
        return dataclasses.replace(stepped, action="load")
    return stepped


def replay(version: int, lineage: int, steps: Sequence[Outcome]) -> list[Outcome] | None:
    """The recorded round outcomes that take a downloaded state at (`version`, `lineage`) to the newest
    state they reach, in order (those the download already holds left out); None when they do not
    chain on from it (a round in between was missed, or the download is of another lineage): the peer
    must download again."""
    chain = []
    for step in steps:
        if step.base_version < version:
            continue
        if (step.base_version, step.base_lineage) != (version, lineage):
            return None
        chain.append(step)
        version, lineage = step.version, step.lineage
    return chain


def is_last_round(gathered: Mapping[object, object]) -> bool:
    """Whether a member began this round as the run's last (it reached the end of the schedule): then
    every member makes it a plain average and ends there, and the peers end on one model."""
    return any(isinstance(g, Mapping) and g.get("final") is True for g in gathered.values())


def default_local_steps(total_steps: int) -> int:
    """`--local-steps` unless given: about 40 rounds over the run, within 8 to 128 local steps.

    A peer takes about one local step per global step when the global batch is one local batch per peer
    (the recipes' shape), so this is a fortieth of the run's global steps. Few rounds over a short run
    would leave the peers' models too far apart to average; past 128 steps the bytes saved per sample
    hardly matter next to the compute (ResNet-50 at 256 images per step: ~1 KB per sample in 8-bit)."""
    return min(128, max(8, total_steps // 40))


def global_step(*, total: int, local_since: int, peers: int, target_global_bsz: int) -> int:
    """The run's progress in global batches: the samples agreed at the last round, plus this peer's
    samples since then as the whole swarm's pace (peers alike on average)."""
    return (total + local_since * max(1, peers)) // max(1, target_global_bsz)


@dataclass(frozen=True)
class RoundTiming:
    """How long a round may look for partners and run, from what the rounds so far measured.

    With averaging in the background, matchmaking costs no compute, only staleness: the update lands
    that much later. It gets a fifth of the time between rounds (peers notice a round within the
    progress tracker's refresh, which is far shorter), within `[least_s, most_s]`; the round is given up
    once it has run for three times the slowest recent round plus its matchmaking, never less than
    `least_timeout_s`.
    """

    least_s: float = 2.0
    most_s: float = 30.0
    least_timeout_s: float = 30.0

    def matchmaking_s(self, interval_s: float | None, configured_s: float) -> float:
        if interval_s is None:
            return configured_s
        return min(self.most_s, max(self.least_s, 0.2 * interval_s))

    def timeout_s(self, recent_round_s: list[float], matchmaking_s: float, configured_s: float) -> float:
        if not recent_round_s:
            return max(configured_s, matchmaking_s + self.least_timeout_s)
        return max(self.least_timeout_s, matchmaking_s + 3.0 * max(recent_round_s))
