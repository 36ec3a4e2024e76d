"""This peer's own claims and finished shards: what its record says, whatever the DHT returns."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    """A shard this peer holds under lease in one epoch."""

    epoch: int
    shard: str


@dataclass(frozen=True)
class Held:
    """A claim as this peer holds it: the shard's index, the claim time others compare, when reading began."""

    claim: Claim
    index: int
    claimed_at: float  # DHT time, the tie-break
    start: float  # wall clock, for shards.jsonl
    backup: bool = False  # a second reading of another peer's straggler


class Holdings:
    """The claims this peer holds (some confirmed but not handed out yet) and the shards it finished.

    The authority for this peer's record: they go into every board it reads and every record it writes,
    whatever the DHT returned. It also remembers when the record was last written and when the state first
    changed since, which tells the renewal thread when to write next. Not thread-safe: `ShardAssigner`
    calls it under its lock.

    Args:
        shards: the split's shard names in manifest order (index -> name).
    """

    def __init__(self, shards: Sequence[str]):
        self._shards, self._index = shards, {name: i for i, name in enumerate(shards)}
        self._held: dict[tuple[int, int], Held] = {}
        self._reserve: deque[Claim] = deque()  # claimed and confirmed, not handed out yet
        self._done: dict[int, set[int]] = {}
        self.lease_until = 0.0  # DHT time until which the last record written holds the claims
        self._renewed = float("-inf")  # when the record was last written (monotonic)
        self._changed = float("inf")  # when the state first changed since then (monotonic)

    # ---- claims ---------------------------------------------------------------------------------------

    def hold(
        self,
        picks: Iterable[tuple[int, int]],
        *,
        claimed_at: float,
        start: float,
        backups: Collection[tuple[int, int]] = (),
    ) -> list[Claim]:
        """Hold the `(epoch, index)` picks, claimed at DHT time `claimed_at` (reading from wall clock `start`);
        those in `backups` are second readings of other peers' stragglers."""
        claims = []
        for epoch, index in picks:
            claims.append(Claim(epoch, self._shards[index]))
            self._held[(epoch, index)] = Held(claims[-1], index, claimed_at, start, (epoch, index) in backups)
        return claims

    def drop(self, picks: Iterable[tuple[int, int]]) -> None:
        """Stop holding the `(epoch, index)` picks (lost to an earlier claim)."""
        for pick in picks:
            self._held.pop(pick, None)

    def reserve(self, claims: Iterable[Claim]) -> None:
        """Keep confirmed claims to hand out one at a time."""
        self._reserve.extend(claims)

    def next_reserved(self) -> Claim | None:
        return self._reserve.popleft() if self._reserve else None

    def handed_out(self) -> list[Claim]:
        """The claims held and handed out (not in reserve)."""
        return [h.claim for h in self._held.values() if h.claim not in self._reserve]

    def finish(self, claim: Claim) -> Held | None:
        """Move `claim` from held to done; None when it is not held."""
        held = self._held.pop((claim.epoch, self._index.get(claim.shard, -1)), None)
        if held is not None:
            self._done.setdefault(claim.epoch, set()).add(held.index)
        return held

    def release(self, claim: Claim) -> bool:
        """Give `claim` back unfinished, to be published at once; False when it is not held."""
        if self._held.pop((claim.epoch, self._index.get(claim.shard, -1)), None) is None:
            return False
        self._changed = float("-inf")  # others may take it: publish now
        return True

    def clear(self) -> None:
        """Hold nothing (leaving the run)."""
        self._held.clear()
        self._reserve.clear()

    # ---- the record -----------------------------------------------------------------------------------

    def claims(self) -> tuple[tuple[int, int, float], ...]:
        """The claims held, as `(epoch, index, claim time)`."""
        return tuple((h.claim.epoch, h.index, h.claimed_at) for h in self._held.values())

    def done(self) -> dict[int, frozenset[int]]:
        """The shards finished, per epoch."""
        return {epoch: frozenset(shards) for epoch, shards in self._done.items()}

    def adopt(self, done: Mapping[int, Iterable[int]]) -> None:
        """Count the shards in `done` (epoch -> indices) as finished here: those of this peer's record from
        before a restart, or those a checkpoint says its model holds when the whole run restarts."""
        for epoch, shards in done.items():
            self._done.setdefault(epoch, set()).update(shards)
        self.touch()

    def forget_before(self, epoch: int) -> None:
        """Drop the done lists of epochs before `epoch` (settled: kept small), once every change is in a
        record written (a shard finished since is not in the DHT yet: it must not be forgotten unsaid)."""
        if self._changed != float("inf"):
            return
        for old in [e for e in self._done if e < epoch]:
            del self._done[old]

    def touch(self) -> None:
        """Note a change to publish soon (the renewal thread writes it within `poll_s`)."""
        self._changed = min(self._changed, time.monotonic())

    def written(self, now: float, lease_until: float) -> float:
        """Note a record written at DHT time `now`, holding the claims until `lease_until`; returns how long
        before `now` the previous lease had lapsed with claims held (0.0: it had not)."""
        lapsed = now - self.lease_until if self._held and 0 < self.lease_until < now else 0.0
        self.lease_until, self._renewed, self._changed = lease_until, time.monotonic(), float("inf")
        return lapsed

    def next_write(self, *, renew_s: float, poll_s: float) -> float:
        """When (monotonic) the record is due again: `renew_s` after the last write, `poll_s` after a change."""
        return min(self._renewed + renew_s, self._changed + poll_s)
