"""`ShardAssigner`: this peer's side of the claim protocol, and what the rest of hivetrain calls.

A claim round publishes this peer's picks, waits for them to settle, re-reads the board and keeps the
claims that `hivetrain.leases.confirmed` says stand; the renewal thread rewrites the record every
`lease_s / 3`, and soon after a change. The DHT sits behind a `RecordStore`, the peer's own claims and
finished shards in `Holdings`, and what is noticed and logged about the run in `BoardObserver`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hivemind
from hivemind.utils import get_dht_time

from ..leases import (
    WINDOW,
    Board,
    Done,
    Lease,
    Position,
    choose,
    confirmed,
    current_epoch,
    late_after,
    shard_order,
    shard_states,
)
from ..leases import position as position_of
from ..metrics import JsonLines
from .holdings import Claim, Holdings
from .observer import BoardObserver
from .store import Records, RecordStore, SingleKeyStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseTiming:
    """How quickly claims are confirmed, re-read and forgotten (seconds).

    Attributes:
        settle_s: least wait between publishing a claim and re-reading it; the wait grows to twice the
            recent DHT store time, so that a rival's claim stored just before ours is seen.
        poll_s: re-read interval while every shard is in flight elsewhere.
        done_ttl_s: how long a peer's record outlives its last write (must outlast the longest epoch).
        request_timeout_s: a DHT call slower than this counts as the DHT being unreachable.
        max_hold_s: a claim that another peer has held for this long, as timed here, without finishing its
            shard counts as abandoned, and others may read the shard too. A renewed lease alone proves
            nothing: a peer whose loader hangs while its renewal thread lives, or a hostile one that
            claims every shard and reads none, would otherwise stall the epoch for good. A slow reader
            costs a duplicate read, never a lost shard.
    """

    settle_s: float = 0.5
    poll_s: float = 1.0
    done_ttl_s: float = 6 * 3600.0
    request_timeout_s: float = 10.0
    max_hold_s: float = 1800.0


class ShardAssigner:
    """Claims shards for this peer, epoch after epoch, sharing the work with the run's other peers.

    The constructor only checks its arguments: `start()` (or entering a `with` block) joins the run.

    Example:
        >>> with ShardAssigner(names, dht=dht, run_id="run1", log_dir=Path("logs"), max_epochs=90) as assigner:
        ...     while (claim := assigner.next_claim()) is not None:
        ...         samples = read(claim.shard)
        ...         assigner.complete(claim, samples)

    Args:
        shards: the split's shard names in manifest order (the same list on every peer of the run).
        dht: a running DHT (ideally from `hivetrain.dht.make_dht(run_id=...)`); None: single-peer mode.
        run_id: the run's name; prefixes the DHT key.
        lease_s: a claim not renewed for this long is taken over by others (renewed every `lease_s / 3`).
        seed: with `run_id` and the epoch, seeds the shard order every peer agrees on.
        log_dir: where `shards.jsonl` gets one line per finished shard (epoch, shard, start, end, samples, peer,
            and `backup` for a second reading of another peer's straggler).
        max_epochs: `next_claim` returns None once this many epochs are complete; None: no end.
        batch: shards claimed per DHT round (publish, settle, re-read), handed out one per `next_claim`.
            A round takes about `settle_s` plus two DHT round trips; a peer that reads shards faster than
            that should claim several per round (its prefetch depth), or it reads no faster than it claims.
        timing: settle, poll and expiry times (`LeaseTiming`).
        rng: this peer's choice among free shards (default: seeded from os.urandom).
        resume: the data position a checkpoint recorded (`position()` when it was taken). It stands when
            the run has no records left in the DHT (every peer stopped): the shards it counts as done are
            not read again in its epoch. A live run's own position stands over it.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        dht: hivemind.DHT | None,
        run_id: str,
        lease_s: float = 30.0,
        seed: int = 0,
        log_dir: Path | None = None,
        max_epochs: int | None = None,
        batch: int = 1,
        timing: LeaseTiming = LeaseTiming(),
        rng: random.Random | None = None,
        resume: Position | None = None,
    ):
        if not shards:
            raise ValueError("no shards to assign")
        if len(set(shards)) != len(shards):
            raise ValueError("shard names must be unique")
        if lease_s <= 0 or batch < 1:
            raise ValueError(f"lease_s must be positive and batch at least 1, got {lease_s} and {batch}")
        self._shards, self._run_id, self._max_epochs = list(shards), run_id, max_epochs
        self._lease_s, self._timing, self._batch = lease_s, timing, batch
        self.claim_rounds_s: deque[float] = deque(maxlen=8)  # recent claim rounds (read, claim, confirm)
        self._rng = rng or random.Random(os.urandom(8))
        order = functools.partial(shard_order, run_id, seed, n=len(self._shards))
        self._order = functools.lru_cache(maxsize=WINDOW + 1)(order)  # epoch -> the order every peer computes
        self._store: RecordStore | None = None
        if dht is not None:
            self._store = SingleKeyStore(
                dht,
                run_id=run_id,
                shards=self._shards,
                ttl_s=timing.done_ttl_s,
                timeout_s=timing.request_timeout_s,
            )
        self._owner = b"[local]"  # the store's key once started
        self._holdings = Holdings(self._shards)
        self._observer = BoardObserver(run_id, self._shards, max_hold_s=timing.max_hold_s)
        self._lock = threading.Lock()  # guards the holdings and the observer
        self._claim_lock = threading.Lock()  # one claim round at a time
        self._closed, self._wake = threading.Event(), threading.Event()
        self._log_path = None if log_dir is None else Path(log_dir) / "shards.jsonl"
        self._log: JsonLines | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self.lost_races = 0
        self._claim_to_done_s: deque[float] = deque(maxlen=9)  # this peer's recent shards, claim to finish
        self._board = Board(len(self._shards), 0.0)  # the last board read
        self._resume = resume
        self._floor = -1  # the last epoch known complete before any board says so (a restart's)

    def start(self) -> ShardAssigner:
        """Join the run: read its records, publish this peer's (others count it from then on) and start the
        renewal thread. Returns the assigner; once started, a second call does nothing."""
        if self._closed.is_set():
            raise RuntimeError("this ShardAssigner is closed: make a new one to join the run again")
        if self._started:
            return self
        self._started = True
        if self._store is not None:
            self._owner = self._store.open()
        if self._log_path is not None:
            self._log = JsonLines(self._log_path)
        self._take_position()
        self._read(max_age=float("inf"))  # the records `_take_position` just read
        if self._store is not None:
            self._publish()
            self._thread = threading.Thread(
                target=self._renew, name=f"ShardAssigner({self._run_id})", daemon=True
            )
            self._thread.start()
        return self

    def _take_position(self) -> None:
        """Start where the run's data stands: this peer's own record from before a restart counts as its
        own work, and when the DHT holds no record of the run at all (every peer stopped), the checkpoint's
        position stands in for the run's."""
        records = Records() if self._store is None else self._store.read()
        with self._lock:
            for record in records.dones:
                if record.owner == self._owner:
                    self._holdings.adopt(record.shards)
                    self._floor = max(self._floor, record.complete)
            if self._resume is None:
                return
            peers = {x.owner for x in (*records.leases, *records.dones)}
            if peers:
                logger.info(
                    "run %s: %d peer(s) of the run have records: the run's data position stands, not the "
                    "checkpoint's", self._run_id, len(peers),
                )  # fmt: skip
                return
            self._holdings.adopt(self._resume.done)
            self._floor = max(self._floor, self._resume.epoch - 1)
        logger.info(
            "run %s: no peer of the run is left: resuming the data where the checkpoint has it, epoch %d "
            "with %d of %d shards done", self._run_id, self._resume.epoch,
            len(self._resume.done.get(self._resume.epoch, ())), len(self._shards),
        )  # fmt: skip

    # ---- public API -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The run's current epoch: the oldest one not yet complete, as last seen."""
        return self._observer.epoch

    @property
    def single_peer(self) -> bool:
        """True when no other peer of the run is visible (alone, no DHT, or the DHT unreachable)."""
        return bool(self._observer.alone)

    @property
    def peer_id(self) -> str:
        """This peer's name in records and logs (its hivemind peer id, or "local")."""
        return "local" if self._store is None else self._store.peer

    @property
    def malformed(self) -> int:
        """Records from other peers ignored because they make no sense (counted once each)."""
        return self._observer.malformed

    def position(self) -> Position:
        """The run's data position, for a checkpoint: its current epoch and the shards done in the open
        epochs, from a board at most `lease_s / 3` old (this peer's own shards as of now). Shards that
        others finished since the board was read are read again after a restart, never skipped."""
        self._check_started()
        return position_of(self._read(max_age=self._lease_s / 3))

    def held(self) -> list[Claim]:
        """The claims this peer holds and has not completed or released."""
        with self._lock:
            return self._holdings.handed_out()

    def next_claim(self, timeout: float | None = None, *, batch: int | None = None) -> Claim | None:
        """Claim the next free shard; several claims may be held at once (prefetch).

        Blocks while no shard is free but some are still in flight. Returns None on timeout, after
        `close()`, or when `max_epochs` epochs are complete. A DHT round claims up to `batch` shards
        (default: the assigner's), handed out by this call and the next ones.
        """
        self._check_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._claim_lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            while not self._closed.is_set():
                with self._lock:
                    claim = self._holdings.next_reserved()
                if claim is not None:
                    return claim
                started = time.monotonic()
                board = self._read(max_age=self._timing.settle_s)  # the last round's confirmation will do
                spread = 1 if self.single_peer else 2 * len(board.live_peers())  # alone: the exact order
                picks: list[tuple[int, int]] = []
                backups: set[tuple[int, int]] = set()
                with self._lock:  # how long shards stay claimed in this run: its own and others'
                    late_s = late_after(
                        [*self._claim_to_done_s, *self._observer.hold_s], least_s=self._lease_s / 2
                    )
                kw = dict(rng=self._rng, spread=spread, max_epochs=self._max_epochs, skip=picks, me=self._owner,
                          late_s=late_s)  # fmt: skip
                most = max(1, batch or self._batch)
                while len(picks) < most and (step := choose(board, self._order, **kw)).kind == "claim":
                    picks.append((step.epoch, step.index))
                    if step.backup:
                        backups.add(picks[-1])
                if picks:
                    self._claim_round(picks, backups)
                    self.claim_rounds_s.append(time.monotonic() - started)
                    continue
                if step.kind == "finished":
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._closed.wait(self._timing.poll_s if left is None else min(self._timing.poll_s, left))
            return None
        finally:
            self._claim_lock.release()

    def complete(self, claim: Claim, samples: int) -> None:
        """Record `claim` as read: a done record in the DHT and a line in `shards.jsonl`."""
        end = time.time()
        with self._lock:
            held = self._holdings.finish(claim)
        if held is None and self._closed.is_set():
            logger.warning(
                "shard %s of epoch %d finished after close(): not recorded", claim.shard, claim.epoch
            )
            return
        if held is None:
            raise ValueError(f"shard {claim.shard} of epoch {claim.epoch} is not held by this peer")
        with self._lock:
            self._claim_to_done_s.append(end - held.start)
        if self._log is not None:
            line = dict(epoch=claim.epoch, shard=claim.shard, start=held.start, end=end, samples=samples)
            self._log.write(dict(line, peer=self.peer_id, **({"backup": True} if held.backup else {})))
        with self._lock:  # published with the next claim round, or by the renewal thread soon after
            self._holdings.touch()
        self._wake.set()

    def finished_elsewhere(self, claim: Claim) -> bool:
        """Whether the last board read shows `claim`'s shard finished by another peer (a backup reader
        took over a shard this peer was slow to reach): no need to read it."""
        index = self._shards.index(claim.shard)
        with self._lock:
            return index in self._board.done(claim.epoch)

    def release(self, claim: Claim) -> None:
        """Give an unfinished shard back at once, for others (or this peer) to read."""
        with self._lock:
            released = self._holdings.release(claim)
        if released:
            self._wake.set()

    def epoch_state(self, epoch: int | None = None) -> dict[str, dict]:
        """Per shard of `epoch` (default: the current one): `state` (done, claimed, backup: claimed by a
        straggler's second reader too, or free) and `holder` peer id."""
        self._check_started()
        board = self._read()
        epoch = current_epoch(board) if epoch is None else epoch
        states = shard_states(board, epoch)
        return {name: {"state": s, "holder": h} for name, (s, h) in zip(self._shards, states, strict=True)}

    def close(self) -> None:
        """Publish what was finished, give back the shards still held, stop the renewal thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._claim_lock, self._lock:  # after any claim round in flight
            self._holdings.clear()
        if self._store is not None and self._started:
            self._publish(leaving=True)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> ShardAssigner:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- claiming ---------------------------------------------------------------------------------

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError(
                "call ShardAssigner.start() first: it joins the run (reads the DHT, publishes)"
            )

    def _claim_round(self, picks: list[tuple[int, int]], backups: set[tuple[int, int]] = frozenset()) -> None:
        """Publish claims on `picks` (`backups`: second readings of stragglers), re-read after the settle
        time, keep in reserve those that stand."""
        with self._lock:
            if self._closed.is_set():
                return
            claims = self._holdings.hold(picks, claimed_at=get_dht_time(), start=time.time(), backups=backups)
            if self._store is None:
                self._holdings.reserve(claims)
                return
        self._publish()
        if self._closed.wait(max(self._timing.settle_s, 2 * self._store.store_s)):
            return  # close() gives the claims back
        board = self._read()
        lost = [pick for pick in picks if not confirmed(board, self._owner, *pick, backup=pick in backups)]
        if kept := len(backups - set(lost)):
            logger.info(
                "run %s: reading %d shard(s) of epoch %d that slower peers have held for long (backup reads)",
                self._run_id, kept, min(e for e, _ in backups),
            )  # fmt: skip
        with self._lock:
            self._holdings.drop(lost)
            self._holdings.reserve(claim for claim, pick in zip(claims, picks) if pick not in lost)
        if lost:
            self.lost_races += len(lost)
            logger.debug("other peers claimed %d shard(s) first", len(lost))
            self._publish()

    def _read(self, max_age: float = 0.0) -> Board:
        """Every peer's records (from the DHT unless the last read is under `max_age` s old), with this
        peer's own state as it is in memory; what changed is logged."""
        records = Records() if self._store is None else self._store.read(max_age=max_age)
        with self._lock:
            others = [self._observer.unabandoned(x) for x in records.leases if x.owner != self._owner]
            lease, done = self._mine(float("inf"))
            board = Board(
                len(self._shards),
                get_dht_time(),
                (*others, lease),
                (*(x for x in records.dones if x.owner != self._owner), done),
            )
            reachable = None if self._store is None else self._store.reachable
            epoch = self._observer.see(board, records, owner=self._owner, reachable=reachable)
            self._holdings.forget_before(epoch - 1)  # epochs before the previous one are settled
            self._board = board
        return board

    def _mine(self, expires: float, written: float = 0.0) -> tuple[Lease, Done]:
        """This peer's lease and done list as its holdings have them (called with `_lock` held)."""
        peer, claims, done = self.peer_id, self._holdings.claims(), self._holdings.done()
        complete = max(self._observer.epoch - 1, self._floor)
        return Lease(self._owner, peer, expires, claims, written), Done(self._owner, peer, complete, done)

    # ---- publishing -------------------------------------------------------------------------------

    def _publish(self, *, leaving: bool = False) -> None:
        """Write this peer's whole record: claims renewed for `lease_s` (none when leaving), done shards."""
        self._store.write(functools.partial(self._record, leaving=leaving))

    def _record(self, now: float, *, leaving: bool) -> tuple[Lease, Done]:
        """This peer's record as of DHT time `now`, noted as written."""
        with self._lock:
            lapsed = self._holdings.written(now, now if leaving else now + self._lease_s)
            if lapsed:
                logger.warning(
                    "run %s: this peer's lease lapsed %.1f s ago (renewal late): others may read its shards too",
                    self._run_id,
                    lapsed,
                )
            return self._mine(self._holdings.lease_until, written=now)

    def _renew(self) -> None:
        """The renewal thread: rewrite the record every `lease_s / 3`, and within `poll_s` of a change
        (a busy peer's next claim round usually publishes it first, saving a write per shard)."""
        while not self._closed.is_set():
            with self._lock:
                due = self._holdings.next_write(renew_s=self._lease_s / 3, poll_s=self._timing.poll_s)
            if self._wake.wait(max(0.0, due - time.monotonic())):
                self._wake.clear()
                continue  # recompute when it is due
            if not self._closed.is_set():
                self._publish()
