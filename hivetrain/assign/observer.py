"""What the run looks like from this peer, read after read: what changed is logged once."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence

from ..dht import clock_offset
from ..leases import Board, Lease, current_epoch
from .store import Records

logger = logging.getLogger(__name__)


class BoardObserver:
    """Follows the boards this peer reads: the current epoch, whether other peers are visible, clocks that
    disagree, malformed records, and claims held too long.

    A claim that another peer has held for `max_hold_s` as timed here (from the first sighting, not the
    claim time its owner wrote) counts as abandoned (why: `LeaseTiming.max_hold_s`). Not thread-safe:
    `ShardAssigner` calls it under its lock.

    Args:
        run_id: the run's name, for the log.
        shards: the split's shard names (index -> name), for the log.
        max_hold_s: how long another peer may hold a claim without finishing its shard.
        remember_s: another peer seen live counts as visible for this long (a board shows the buckets
            read, not every peer).
    """

    SIZE_MEMORY = 4
    """`peers_met` counts the peers seen live within this many `remember_s`."""

    def __init__(self, run_id: str, shards: Sequence[str], *, max_hold_s: float, remember_s: float = 0.0):
        self._run_id, self._shards, self._max_hold_s = run_id, shards, max_hold_s
        self._remember_s = remember_s
        self._seen: dict[bytes, float] = {}  # other peers seen live lately -> when (monotonic)
        self.epoch = -1
        """The run's current epoch (the oldest not complete) as last seen; -1 before the first board."""
        self.alone: bool | None = None
        """Whether no other peer was visible on the last board; None before the first."""
        self._malformed: set[tuple[bytes, float]] = set()
        self._skewed: set[bytes] = set()
        self._first_seen: dict[tuple[bytes, int, int], float] = {}  # others' claims (monotonic)
        self._abandoned: set[tuple[bytes, int, int]] = set()
        self.hold_s: deque[float] = deque(maxlen=32)
        """How long other peers' recent shards stayed claimed, from first sighting here to done."""
        self._timed: set[tuple[bytes, int, int]] = set()  # claims whose hold is in `hold_s`

    @property
    def malformed(self) -> int:
        """Records from other peers ignored because they make no sense (counted once each)."""
        return len(self._malformed)

    def unabandoned(self, lease: Lease) -> Lease:
        """Another peer's `lease` without the claims it has held for over `max_hold_s` (warned once each)."""
        now, keep = time.monotonic(), []
        for e, i, t in lease.claims:
            key = (lease.owner, e, i)
            if now - self._first_seen.setdefault(key, now) < self._max_hold_s:
                keep.append((e, i, t))
            elif key not in self._abandoned:
                self._abandoned.add(key)
                logger.warning(
                    "run %s: peer %s has held shard %s of epoch %d for over %.0f s without finishing it: "
                    "treating its claim as abandoned (the shard may be read twice)",
                    self._run_id, lease.peer, self._shards[i], e, self._max_hold_s,
                )  # fmt: skip
        return lease if len(keep) == len(lease.claims) else dataclasses.replace(lease, claims=tuple(keep))

    @property
    def peers_met(self) -> int:
        """Other peers seen live in the buckets read lately: the swarm's size as far as this peer knows."""
        return len(self._seen)

    def see(self, board: Board, records: Records, *, owner: bytes, reachable: bool | None) -> int:
        """Take in a board built from `records` (this peer: `owner`; `reachable`: None without a DHT) and
        log what changed; returns the current epoch."""
        self._note_malformed(records.malformed)
        self._note_finished(records)
        self._note_epoch(current_epoch(board))
        now = time.monotonic()
        self._seen.update((peer, now) for peer in board.live_peers() if peer != owner)
        self._seen = {
            peer: t for peer, t in self._seen.items() if now - t <= self.SIZE_MEMORY * self._remember_s
        }
        self._note_alone(sum(now - t <= self._remember_s for t in self._seen.values()), reachable)
        for lease in records.leases:
            if lease.owner not in self._skewed and lease.owner != owner and lease.expires > board.now:
                self._note_clock(lease, board.now)
        return self.epoch

    def _note_malformed(self, malformed: Sequence[tuple[bytes, float]]) -> None:
        new = set(malformed) - self._malformed
        if new:
            self._malformed |= new
            logger.warning("run %s: ignored %d malformed record(s) from other peers", self._run_id, len(new))

    def _note_finished(self, records: Records) -> None:
        """Time the claims of others that their records show done now (a claim may outlive its shard's
        completion: a straggler's, whose backup reader finished first; it is timed once)."""
        now, done, board = time.monotonic(), {}, Board(len(self._shards), 0.0, (), records.dones)
        for key, seen in self._first_seen.items():
            _, e, i = key
            if (
                key not in self._timed
                and key not in self._abandoned
                and i in done.setdefault(e, board.done(e))
            ):
                self._timed.add(key)
                self.hold_s.append(now - seen)

    def _note_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        if self.epoch >= 0 and epoch > self.epoch:
            logger.info("run %s: epoch %d complete, epoch %d begins", self._run_id, epoch - 1, epoch)
        elif self.epoch < 0 and epoch > 0:
            logger.info("run %s: joining at epoch %d", self._run_id, epoch)
        self.epoch = epoch
        for key in [k for k in self._first_seen if k[1] < epoch - 1]:
            del self._first_seen[key]
        self._abandoned = {k for k in self._abandoned if k[1] >= epoch - 1}
        self._timed = {k for k in self._timed if k[1] >= epoch - 1}

    def _note_alone(self, others: int, reachable: bool | None) -> None:
        alone = not reachable or others == 0
        if alone == self.alone:
            return
        if alone:
            why = "no other peer of this run is visible" if reachable else "the DHT is unreachable"
            why = "no DHT" if reachable is None else why
            logger.log(
                logging.INFO if reachable else logging.WARNING,
                "run %s: %s: reading every shard alone (single-peer mode)",
                self._run_id,
                why,
            )
        elif self.alone is not None:
            logger.info("run %s: %d other peer(s) visible: sharing the shards", self._run_id, others)
        self.alone = alone

    def _note_clock(self, lease: Lease, now: float) -> None:
        offset = clock_offset(lease.written, now=now, max_age=lease.expires - lease.written)
        if offset is not None:
            self._skewed.add(lease.owner)
            logger.warning(
                "peer %s wrote its record %+.1f s from our clock: synchronize clocks (NTP), "
                "or claims will collide and leases expire early",
                lease.peer,
                offset,
            )
