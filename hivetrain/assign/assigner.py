"""`ShardAssigner`: this peer's side of the claim protocol, and what the rest of hivetrain calls.

A claim round reads one or two buckets of the open epochs (`hivetrain.leases.plan_views`), publishes this
peer's picks there, waits for them to settle, re-reads those buckets and keeps the claims that
`hivetrain.leases.confirmed` says stand; the renewal thread rewrites the records holding claims every
`lease_s / 3`, and soon after a change. The DHT sits behind a `RecordStore`, the peer's own claims and
finished shards in `Holdings`, and what is noticed and logged about the run in `BoardObserver`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import hivemind
from hivemind.utils import get_dht_time

from ..leases import (
    BUCKET_SIZE,
    WINDOW,
    Board,
    Done,
    Lease,
    Position,
    bucket_count,
    bucket_shards,
    bucket_state,
    choose,
    confirmed,
    current_epoch,
    front,
    late_after,
    plan_views,
    shard_order,
    shard_states,
    stragglers,
)
from ..leases import position as position_of
from ..metrics import JsonLines
from .holdings import Claim, Holdings
from .observer import BoardObserver
from .store import BucketStore, Progress, Records, RecordStore, View

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
        recheck_s: a bucket found with nothing to claim is read again after this long (None: a third of
            the lease), one such bucket per claim round: a dead peer's claims are found within about
            `lease_s + recheck_s`.
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
    recheck_s: float | None = None
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
        bucket_size: shards per bucket (`hivetrain.leases.BUCKET_SIZE`); the same on every peer of the run.
        store: makes the store of this peer's records over `dht` (default `BucketStore`), given its
            arguments; `bench/swarm_sim.py` gives one over a simulated DHT.
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
        bucket_size: int = BUCKET_SIZE,
        store: Callable[..., RecordStore] = BucketStore,
    ):
        if not shards:
            raise ValueError("no shards to assign")
        if len(set(shards)) != len(shards):
            raise ValueError("shard names must be unique")
        if lease_s <= 0 or batch < 1 or bucket_size < 1:
            raise ValueError(
                f"lease_s must be positive, batch and bucket_size at least 1, got {lease_s}, {batch}, {bucket_size}"
            )
        self._shards, self._run_id, self._max_epochs = list(shards), run_id, max_epochs
        self._lease_s, self._timing, self._batch = lease_s, timing, batch
        self.claim_rounds_s: deque[float] = deque(maxlen=8)  # recent claim rounds (read, claim, confirm)
        self._rng = rng or random.Random(os.urandom(8))
        order = functools.partial(shard_order, run_id, seed, n=len(self._shards))
        self._order = functools.lru_cache(maxsize=WINDOW + 1)(order)  # epoch -> the order every peer computes
        positions = lambda epoch: {index: k for k, index in enumerate(self._order(epoch))}  # noqa: E731
        self._positions = functools.lru_cache(maxsize=WINDOW + 2)(positions)  # epoch -> shard -> place
        self._size, self._count = bucket_size, bucket_count(len(self._shards), bucket_size)
        self._recheck_s = lease_s / 3 if timing.recheck_s is None else timing.recheck_s
        self._complete: dict[int, set[int]] = {}  # per epoch: buckets known complete
        self._exhausted: dict[int, dict[int, float]] = {}  # per epoch: bucket -> when found with nothing free
        self._stay: View | None = None  # the bucket the last claim round claimed from
        self._unchecked: set[View] = set()  # buckets where this peer finished a shard since they were read
        self._marks = Progress()  # as last read from the DHT
        self._store: RecordStore | None = None
        if dht is not None:
            self._store = store(
                dht,
                run_id=run_id,
                shards=self._shards,
                bucket_of=self._bucket_of,
                buckets=self._count,
                ttl_s=timing.done_ttl_s,
                timeout_s=timing.request_timeout_s,
            )
        self._owner = b"[local]"  # the store's key once started
        self._holdings = Holdings(self._shards)
        self._observer = BoardObserver(run_id, self._shards, max_hold_s=timing.max_hold_s, remember_s=lease_s)
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
        # shards held here that another peer finished, or holds too as a backup reader
        self._taken: set[tuple[int, int]] = set()
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
        views = self._take_position()
        self._read(views, max_age=float("inf"))  # the records `_take_position` just read
        if self._store is not None:
            self._publish()
            self._thread = threading.Thread(
                target=self._renew, name=f"ShardAssigner({self._run_id})", daemon=True
            )
            self._thread.start()
        return self

    def _take_position(self) -> list[View]:
        """Start where the run's data stands: after the last epoch marked complete, with this peer's own
        records from before a restart counted as its own work; when the DHT holds no record of the run
        at all (every peer stopped), the checkpoint's position stands in for the run's. Reads every
        bucket of the open epochs once (a join costs as much as a few claim rounds); returns them."""
        views: list[View] = []
        if self._store is not None:
            self._marks = self._store.progress([], max_age=0.0)
            floor = self._marks.floor
            self._marks = self._store.progress(range(floor + 1, floor + 1 + WINDOW))
            views = [
                (e, b) for e in range(floor + 1, floor + 1 + WINDOW)
                for b in range(self._count) if b not in self._marks.complete.get(e, ())
            ]  # fmt: skip
        records = Records() if self._store is None else self._store.read(views)
        with self._lock:
            self._floor = max(self._floor, self._marks.floor)
            for record in records.dones:
                if record.owner == self._owner:
                    self._holdings.adopt(record.shards)
            if self._resume is None:
                return views
            peers = {x.owner for x in (*records.leases, *records.dones)}
            if peers or self._marks.floor >= 0 or any(self._marks.complete.values()):
                logger.info(
                    "run %s: %d peer(s) of the run have records: the run's data position stands, not the "
                    "checkpoint's", self._run_id, len(peers),
                )  # fmt: skip
                return views
            self._holdings.adopt(self._resume.done)
            self._floor = max(self._floor, self._resume.epoch - 1)
        if self._store is not None and self._resume.epoch > 0:  # peers joining now start from there too
            self._store.mark(self._resume.epoch - 1, (), epoch_complete=True)
        logger.info(
            "run %s: no peer of the run is left: resuming the data where the checkpoint has it, epoch %d "
            "with %d of %d shards done", self._run_id, self._resume.epoch,
            len(self._resume.done.get(self._resume.epoch, ())), len(self._shards),
        )  # fmt: skip
        return views

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
        return position_of(self._read_epochs(self._open_epochs(), max_age=self._lease_s / 3))

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
                with self._lock:
                    views = self._plan()
                if not views:  # every bucket of the open epochs complete or found exhausted lately
                    board = self._read([], max_age=self._timing.poll_s)  # marks: has the epoch ended?
                    if (
                        choose(board, self._order, rng=self._rng, max_epochs=self._max_epochs).kind
                        == "finished"
                    ):
                        return None
                    if self._wait(deadline):
                        return None
                    continue
                board = self._read(views, max_age=self._timing.settle_s)  # the last round's will do
                spread = 1 if self.single_peer else 2 * len(board.live_peers())  # alone: the exact order
                picks: list[tuple[int, int]] = []
                backups: set[tuple[int, int]] = set()
                with self._lock:
                    late_s = self._backup_after(board, views)
                kw = dict(rng=self._rng, spread=spread, max_epochs=self._max_epochs, skip=picks, me=self._owner,
                          late_s=late_s)  # fmt: skip
                most = max(1, batch or self._batch)
                order = functools.partial(self._view_order, views)
                while len(picks) < most and (step := choose(board, order, **kw)).kind == "claim":
                    picks.append((step.epoch, step.index))
                    if step.backup:
                        backups.add(picks[-1])
                with self._lock:
                    found, _ = self._note_views(board, views, picks, late_s)
                if picks:
                    self._stay = views[-1]  # the target: claimed from again while it is open
                    self._claim_round(picks, backups, views)
                    self.claim_rounds_s.append(time.monotonic() - started)
                    continue
                if step.kind == "finished":
                    return None
                if not found and self._wait(deadline):  # nothing new learned: wait before reading again
                    return None
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
            self._unchecked.add((claim.epoch, self._bucket_of(claim.epoch, held.index)))
        self._wake.set()

    def _wait(self, deadline: float | None) -> bool:
        """Wait a poll interval (less if `deadline` is nearer); whether to give up (closed, or timed out)."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return True
        self._closed.wait(self._timing.poll_s if left is None else min(self._timing.poll_s, left))
        return self._closed.is_set()

    def taken_elsewhere(self, claim: Claim) -> bool:
        """Whether `claim`'s shard was finished by another peer, or, this peer's claim being the first,
        another peer holds it as a backup reader, as the boards read lately show: a shard this peer is
        slow to reach, which it need not read (it gives the claim back, and the backup reader's is the
        only reading: work stolen, not read twice). Answers from memory, never waits on the DHT: the
        renewal thread re-reads the buckets of claims held long enough to be backed up."""
        index = self._shards.index(claim.shard)
        with self._lock:
            return (claim.epoch, index) in self._taken or index in self._board.done(claim.epoch)

    def release(self, claim: Claim) -> None:
        """Give an unfinished shard back at once, for others (or this peer) to read."""
        with self._lock:
            released = self._holdings.release(claim)
            if released:  # its bucket offers a shard again
                bucket = self._bucket_of(claim.epoch, self._shards.index(claim.shard))
                self._exhausted.get(claim.epoch, {}).pop(bucket, None)
        if released:
            self._wake.set()

    def epoch_state(self, epoch: int | None = None) -> dict[str, dict]:
        """Per shard of `epoch` (default: the current one): `state` (done, claimed, backup: claimed by a
        straggler's second reader too, or free) and `holder` peer id."""
        self._check_started()
        epoch = current_epoch(self._read([])) if epoch is None else epoch
        states = shard_states(self._read_epochs([epoch]), epoch)
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

    def _claim_round(
        self, picks: list[tuple[int, int]], backups: set[tuple[int, int]], views: list[View]
    ) -> None:
        """Publish claims on `picks` (`backups`: second readings of stragglers) in the buckets `views`,
        re-read them after the settle time, keep in reserve the claims that stand."""
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
        board = self._read(views)
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

    def _bucket_of(self, epoch: int, index: int) -> int:
        return self._positions(epoch)[index] // self._size

    def _view_order(self, views: Sequence[View], epoch: int) -> list[int]:
        """The shards of `epoch` in `views`, bucket after bucket, each in the epoch's order."""
        return [i for e, b in views if e == epoch for i in bucket_shards(self._order(e), b, self._size)]

    def _open_epochs(self) -> list[int]:
        base = max(self._observer.epoch, self._floor + 1, 0)
        return [e for e in range(base, base + WINDOW) if self._max_epochs is None or e < self._max_epochs]

    def _plan(self) -> list[View]:
        """The buckets the next claim round reads (called with `_lock` held)."""
        return plan_views(
            self._open_epochs(), self._count, self._complete, self._exhausted, now=time.monotonic(),
            recheck_s=self._recheck_s, rng=self._rng,
            spread=1 if self.single_peer else front(self._observer.peers_met + 1), stay=self._stay,
        )  # fmt: skip

    def _late_s(self) -> float | None:
        """How long another peer may hold a shard before it counts as late, from how long shards stay
        claimed in this run, this peer's and others' (called with `_lock` held)."""
        return late_after([*self._claim_to_done_s, *self._observer.hold_s], least_s=self._lease_s / 2)

    def _backup_after(self, board: Board, views: Sequence[View]) -> float | None:
        """The `late_s` for this round's `choose` (None: no backup reads this round). Backups wait for the
        epoch's tail (`_in_tail`); a peer whose own shards take that long reads none (the straggler would
        give its shard up to it, `taken_elsewhere`, only to wait longer); and an idle peer tries one with
        a chance of two per straggler among the peers it knows, or every idle peer of a large swarm would
        race for the same few and fill their bucket with losing claims (called with `_lock` held)."""
        late_s, epoch, mine = self._late_s(), current_epoch(board), self._claim_to_done_s
        if late_s is None or not self._in_tail(epoch, views):
            return None
        if len(mine) >= 3 and statistics.median(mine) > late_s:
            return None
        late = stragglers(board, epoch, late_s, me=self._owner)
        return late_s if self._rng.random() < 2 * len(late) / (self._observer.peers_met + 1) else None

    def _in_tail(self, epoch: int, views: Sequence[View]) -> bool:
        """Whether `epoch` has nothing left to claim outside `views`, as far as this peer knows (its other
        buckets complete or found exhausted): only then are its stragglers backed up. A bucket read in the
        middle of an epoch often has nothing free but shards in slower peers' read-ahead queues; backing
        those up while other buckets still offer shards only reads them twice (called with `_lock` held)."""
        known = self._complete.get(epoch, set()) | set(self._exhausted.get(epoch, {}))
        return all(b in known or (epoch, b) in views for b in range(self._count))

    def _note_views(
        self, board: Board, views: Sequence[View], picks: Sequence[tuple[int, int]], late_s: float | None
    ) -> tuple[bool, dict[int, list[int]]]:
        """Note what each bucket read offers (`bucket_state`); returns whether any is newly complete or
        newly found exhausted, and the buckets newly complete (called with `_lock` held)."""
        base, now, found, newly = current_epoch(board), time.monotonic(), False, {}
        for e, b in views:
            shards = bucket_shards(self._order(e), b, self._size)
            state = bucket_state(
                board, e, shards, me=self._owner, late_s=late_s if e == base else None, skip=picks
            )
            exhausted = self._exhausted.setdefault(e, {})
            if state == "complete":
                if b not in self._complete.setdefault(e, set()):
                    found = True
                    newly.setdefault(e, []).append(b)
                    self._complete[e].add(b)
                exhausted.pop(b, None)
            elif state == "exhausted":
                found = found or b not in exhausted
                exhausted[b] = now
            else:
                exhausted.pop(b, None)
        return found, newly

    def _mark(self, newly: dict[int, list[int]]) -> None:
        """Publish the buckets newly found complete, and an epoch whose buckets all are."""
        for epoch, buckets in newly.items():
            with self._lock:
                whole = len(self._complete.get(epoch, ())) >= self._count
                if whole:
                    self._floor = max(self._floor, epoch)
            if self._store is not None:
                self._store.mark(epoch, buckets, epoch_complete=whole and self._marks.floor < epoch)

    def _check_finished(self) -> None:
        """Re-read the buckets where this peer finished shards since: mark those now complete."""
        with self._lock:
            views, self._unchecked = sorted(self._unchecked), set()
        if views:
            board = self._read(views)
            with self._lock:
                _, newly = self._note_views(board, views, (), None)
            self._mark(newly)

    def _read_epochs(self, epochs: Sequence[int], max_age: float = 0.0) -> Board:
        """A board of every bucket of `epochs` not known complete (for checkpoints and the epoch's grid)."""
        self._read([], max_age=max_age)  # the marks first
        with self._lock:
            views = [(e, b) for e in epochs for b in range(self._count) if b not in self._complete.get(e, ())]
        return self._read(views, max_age=max_age)

    def _read(self, views: Sequence[View], max_age: float = 0.0) -> Board:
        """The records of the buckets `views` (from the DHT unless read under `max_age` s ago) and the
        run's marks (under `lease_s / 3` old), with this peer's own state as it is in memory; what changed
        is logged. Shards of buckets marked complete count as done."""
        records = Records()
        if self._store is not None:
            with self._lock:
                epochs = self._open_epochs()
            records = self._store.read(
                views, max_age=max_age, marks_of=epochs, marks_age=max(max_age, self._lease_s / 3)
            )  # one round of requests
            marks = records.progress
        with self._lock:
            if self._store is not None:
                self._marks = marks
                self._floor = max(self._floor, marks.floor)
                for e, buckets in marks.complete.items():
                    self._complete.setdefault(e, set()).update(buckets)
            others = [self._observer.unabandoned(x) for x in records.leases if x.owner != self._owner]
            lease, done = self._mine(float("inf"))
            marked = {
                e: frozenset(i for b in buckets for i in bucket_shards(self._order(e), b, self._size))
                for e, buckets in self._complete.items() if e > self._floor
            }  # fmt: skip
            board = Board(
                len(self._shards),
                get_dht_time(),
                (*others, lease),
                (
                    *(x for x in records.dones if x.owner != self._owner),
                    done,
                    Done(b"", "", self._floor, marked),
                ),
            )
            held = {(e, i) for e, i, _ in lease.claims}
            self._taken &= held
            for e in {e for e, _ in held}:
                done, claims = board.done(e), board.claims(e)
                for i in (i for epoch, i in held if epoch == e):
                    by = claims.get(i, ())
                    if i in done or (len(by) > 1 and by[0][1] == self._owner):
                        self._taken.add((e, i))
            reachable = None if self._store is None else self._store.reachable
            epoch = self._observer.see(board, records, owner=self._owner, reachable=reachable)
            self._holdings.forget_before(epoch - 1)  # epochs before the previous one are settled
            for old in [e for e in (*self._complete, *self._exhausted) if e < epoch - 1]:
                self._complete.pop(old, None)
                self._exhausted.pop(old, None)
            self._board = board
        return board

    def _mine(self, expires: float, written: float = 0.0) -> tuple[Lease, Done]:
        """This peer's lease and done list as its holdings have them (called with `_lock` held)."""
        peer, claims, done = self.peer_id, self._holdings.claims(), self._holdings.done()
        complete = max(self._observer.epoch - 1, self._floor)
        return Lease(self._owner, peer, expires, claims, written), Done(self._owner, peer, complete, done)

    # ---- publishing -------------------------------------------------------------------------------

    def _publish(self, *, leaving: bool = False) -> None:
        """Write this peer's records: claims renewed for `lease_s` (none when leaving), done shards."""
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
        (a busy peer's next claim round usually publishes it first, saving a write per shard); then check
        the buckets where this peer finished shards (off the claim rounds' path: a round's every
        sequential request costs a round trip, a link's queue behind an averaging round)."""
        while not self._closed.is_set():
            with self._lock:
                due = self._holdings.next_write(renew_s=self._lease_s / 3, poll_s=self._timing.poll_s)
            if self._wake.wait(max(0.0, due - time.monotonic())):
                self._wake.clear()
                continue  # recompute when it is due
            if not self._closed.is_set():
                self._publish()
                self._check_finished()
                self._check_held()

    def _check_held(self) -> None:
        """Re-read the buckets of the claims held here for longer than others take a shard to be late:
        a backup reader may have taken them over (`taken_elsewhere`)."""
        with self._lock:
            late_s, now = self._late_s() or self._lease_s / 2, get_dht_time()
            views = sorted(
                {(e, self._bucket_of(e, i)) for e, i, t in self._holdings.claims() if now - t > late_s}
            )
        if views:
            self._read(views, max_age=self._timing.poll_s)
