"""Dividing each epoch's shards among the peers of a run through signed leases in the hivemind DHT.

No coordinator. Every peer publishes one record (`hivetrain.dht.PeerRecord`) under the key
`<run_id>_shards`, in a subkey signed with its own key, and rewrites it whole on every change:

* its claims, `(epoch, shard index, claim time)`, valid until `lease_until`; it renews them every
  `lease_s / 3`, so a dead peer's shards come free within `lease_s`;
* the shards it finished in the epochs still open and the last epoch it saw complete; the record
  lives for hours, so a joining peer learns the current epoch and what is left, and finishing a shard
  (claims -> done) is one atomic write.

A peer reads all records with one `get`, picks at random among the first few free shards of the epoch's
order (a permutation seeded by run id, seed and epoch that all peers compute alike), publishes its claim,
re-reads after a short settle and backs off if an earlier claim (then the lower key) holds the same
shard: the DHT has no compare-and-swap. When the current epoch has no free shard left, peers start the
next one rather than idle (at most two epochs are open at once), and shards of the older epoch whose
leases expire are taken first. Work is taken, never pre-assigned, so a faster peer reads more shards.

The decision itself (`hivetrain.leases`: `Board`, `current_epoch`, `choose`, `confirmed`) is pure and is
tested without a DHT; `ShardAssigner` adds the DHT reads and writes, the renewal thread and the
`shards.jsonl` log.
"""

from __future__ import annotations

import dataclasses
import json
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

from .dht import clock_offset, ensure_run_validators
from .leases import (
    WINDOW,
    Board,
    Done,
    Lease,
    choose,
    confirmed,
    current_epoch,
    parse_records,
    shard_list_fingerprint,
    shard_order,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """A shard this peer holds under lease in one epoch."""

    epoch: int
    shard: str


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


@dataclass(frozen=True)
class _Held:
    claim: Claim
    index: int
    claimed_at: float  # DHT time, the tie-break
    start: float  # wall clock, for shards.jsonl


class ShardAssigner:
    """Claims shards for this peer, epoch after epoch, sharing the work with the run's other peers.

    Example:
        >>> assigner = ShardAssigner(names, dht=dht, run_id="run1", log_dir=Path("logs"), max_epochs=90)
        >>> while (claim := assigner.next_claim()) is not None:
        ...     samples = read(claim.shard)
        ...     assigner.complete(claim, samples)
        >>> assigner.close()

    Args:
        shards: the split's shard names in manifest order (the same list on every peer of the run).
        dht: a running DHT (ideally from `hivetrain.dht.make_dht(run_id=...)`); None: single-peer mode.
        run_id: the run's name; prefixes the DHT key.
        lease_s: a claim not renewed for this long is taken over by others (renewed every `lease_s / 3`).
        seed: with `run_id` and the epoch, seeds the shard order every peer agrees on.
        log_dir: where `shards.jsonl` gets one line per finished shard (epoch, shard, start, end, samples, peer).
        max_epochs: `next_claim` returns None once this many epochs are complete; None: no end.
        batch: shards claimed per DHT round (publish, settle, re-read), handed out one per `next_claim`.
            A round takes about `settle_s` plus two DHT round trips; a peer that reads shards faster than
            that should claim several per round (its prefetch depth), or it reads no faster than it claims.
        timing: settle, poll and expiry times (`LeaseTiming`).
        rng: this peer's choice among free shards (default: seeded from os.urandom).
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
    ):
        if not shards:
            raise ValueError("no shards to assign")
        if len(set(shards)) != len(shards):
            raise ValueError("shard names must be unique")
        if lease_s <= 0 or batch < 1:
            raise ValueError(f"lease_s must be positive and batch at least 1, got {lease_s} and {batch}")
        self._shards, self._index = list(shards), {name: i for i, name in enumerate(shards)}
        self._dht, self._run_id, self._seed, self._max_epochs = dht, run_id, seed, max_epochs
        self._lease_s, self._timing, self._batch = lease_s, timing, batch
        self._key, self._fp = f"{run_id}_shards", shard_list_fingerprint(self._shards)
        self._rng = rng or random.Random(os.urandom(8))
        self._lock, self._dht_lock, self._log_lock = threading.RLock(), threading.Lock(), threading.Lock()
        self._claim_lock = threading.Lock()  # one claim round at a time
        self._closed, self._wake = threading.Event(), threading.Event()
        # this peer's own state: the authority for its record, whatever the DHT returns
        self._held: dict[tuple[int, int], _Held] = {}
        self._reserve: deque[Claim] = deque()  # claimed and confirmed, not handed out yet
        self._done: dict[int, set[int]] = {}
        self._expiration, self._lease_until, self._renewed = 0.0, 0.0, float("-inf")
        self._store_s = 0.0  # moving average of how long our DHT stores take
        self._changed = float("inf")  # when our state first changed since the last publish (monotonic)
        # what the last read saw
        self._remote: tuple[list[Lease], list[Done]] = ([], [])
        self._fetched = float("-inf")
        self._epoch, self._alone, self._reachable = -1, None, True
        self._bad: set[tuple[bytes, float]] = set()
        self._skewed: set[bytes] = set()
        self._claim_seen: dict[tuple[bytes, int, int], float] = {}  # others' claims: first seen (monotonic)
        self._abandoned: set[tuple[bytes, int, int]] = set()
        self._orders: dict[int, list[int]] = {}
        self.lost_races = 0
        if dht is not None:
            self._owner, self._peer = ensure_run_validators(dht, run_id), dht.peer_id.to_base58()
        else:
            self._owner, self._peer = b"[local]", "local"
        self._log = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._log = open(Path(log_dir) / "shards.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._read()
        self._thread = None
        if dht is not None:
            self._publish()  # others count this peer from now on
            self._thread = threading.Thread(target=self._renew, name=f"ShardAssigner({run_id})", daemon=True)
            self._thread.start()

    # ---- public API -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The run's current epoch: the oldest one not yet complete, as last seen."""
        return self._epoch

    @property
    def single_peer(self) -> bool:
        """True when no other peer of the run is visible (alone, no DHT, or the DHT unreachable)."""
        return bool(self._alone)

    @property
    def peer_id(self) -> str:
        """This peer's name in records and logs (its hivemind peer id, or "local")."""
        return self._peer

    @property
    def malformed(self) -> int:
        """Records from other peers ignored because they make no sense (counted once each)."""
        return len(self._bad)

    def held(self) -> list[Claim]:
        """The claims this peer holds and has not completed or released."""
        with self._lock:
            return [h.claim for h in self._held.values() if h.claim not in self._reserve]

    def next_claim(self, timeout: float | None = None) -> Claim | None:
        """Claim the next free shard; several claims may be held at once (prefetch).

        Blocks while no shard is free but some are still in flight. Returns None on timeout, after
        `close()`, or when `max_epochs` epochs are complete.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._claim_lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            while not self._closed.is_set():
                if self._reserve:
                    return self._reserve.popleft()
                board = self._read(max_age=self._timing.settle_s)  # the last round's confirmation will do
                spread = 1 if self.single_peer else 2 * len(board.live_peers())  # alone: the exact order
                picks: list[tuple[int, int]] = []
                kw = dict(rng=self._rng, spread=spread, max_epochs=self._max_epochs, skip=picks)
                while len(picks) < self._batch and (step := choose(board, self._order, **kw)).kind == "claim":
                    picks.append((step.epoch, step.index))
                if picks:
                    self._reserve.extend(self._claim_round(picks))
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
            held = self._held.pop((claim.epoch, self._index.get(claim.shard, -1)), None)
            if held is None and self._closed.is_set():
                logger.warning(
                    "shard %s of epoch %d finished after close(): not recorded", claim.shard, claim.epoch
                )
                return
            if held is None:
                raise ValueError(f"shard {claim.shard} of epoch {claim.epoch} is not held by this peer")
            self._done.setdefault(claim.epoch, set()).add(held.index)
        if self._log is not None:
            line = dict(epoch=claim.epoch, shard=claim.shard, start=held.start, end=end, samples=samples)
            with self._log_lock:
                self._log.write(json.dumps(dict(line, peer=self._peer)) + "\n")
                self._log.flush()
        with self._lock:  # published with the next claim round, or by the renewal thread soon after
            self._changed = min(self._changed, time.monotonic())
        self._wake.set()

    def release(self, claim: Claim) -> None:
        """Give an unfinished shard back at once, for others (or this peer) to read."""
        with self._lock:
            if self._held.pop((claim.epoch, self._index.get(claim.shard, -1)), None) is None:
                return
            self._changed = float("-inf")  # others may take it: publish now
        self._wake.set()

    def epoch_state(self, epoch: int | None = None) -> dict[str, dict]:
        """Per shard of `epoch` (default: the current one): `state` done/claimed/free and `holder` peer id."""
        board = self._read()
        epoch = current_epoch(board) if epoch is None else epoch
        done, held = board.done(epoch), {i: h[2] for i, h in board.holders(epoch).items()}

        def state(i: int) -> dict:
            if i in done:
                return {"state": "done", "holder": done[i]}
            return {"state": "claimed", "holder": held[i]} if i in held else {"state": "free", "holder": None}

        return {name: state(i) for i, name in enumerate(self._shards)}

    def close(self) -> None:
        """Publish what was finished, give back the shards still held, stop the renewal thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._claim_lock, self._lock:  # after any claim round in flight
            self._held.clear()
            self._reserve.clear()
        if self._dht is not None:
            self._publish(leaving=True)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> ShardAssigner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- claiming ---------------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            for old in [e for e in self._orders if e < epoch - WINDOW]:
                del self._orders[old]
            self._orders[epoch] = shard_order(self._run_id, self._seed, epoch, len(self._shards))
        return self._orders[epoch]

    def _claim_round(self, picks: list[tuple[int, int]]) -> list[Claim]:
        """Publish claims, re-read after the settle time, keep those that are the earliest."""
        with self._lock:
            if self._closed.is_set():
                return []
            now, start = get_dht_time(), time.time()
            for epoch, index in picks:
                self._held[(epoch, index)] = _Held(Claim(epoch, self._shards[index]), index, now, start)
        if self._dht is None:
            return [Claim(epoch, self._shards[index]) for epoch, index in picks]
        self._publish()
        if self._closed.wait(max(self._timing.settle_s, 2 * self._store_s)):
            return []  # close() gives the claims back
        board = self._read()
        won = [pick for pick in picks if confirmed(board, self._owner, *pick)]
        if len(won) < len(picks):
            self.lost_races += len(picks) - len(won)
            with self._lock:
                for pick in set(picks) - set(won):
                    self._held.pop(pick, None)
            logger.debug("other peers claimed %d shard(s) first", len(picks) - len(won))
            self._publish()
        return [Claim(epoch, self._shards[index]) for epoch, index in won]

    # ---- reading the board ------------------------------------------------------------------------

    def _read(self, max_age: float = 0.0) -> Board:
        """Every peer's records (from the DHT unless the last read is under `max_age` s old), with this
        peer's own state as it is in memory."""
        if self._dht is not None and time.monotonic() - self._fetched > max_age:
            remote: tuple[list[Lease], list[Done]] = ([], [])
            try:
                with self._dht_lock:
                    future = self._dht.get(self._key, latest=True, return_future=True)
                value = future.result(timeout=self._timing.request_timeout_s)
                *remote, bad = parse_records(value, n=len(self._shards), fp=self._fp, now=get_dht_time())
                self._note_bad(bad)
                self._set_reachable(True)
            except Exception as e:  # a dead DHT process, a closed pipe, a timeout: carry on alone
                self._set_reachable(False, e)
            self._remote, self._fetched = tuple(remote), time.monotonic()
        leases, dones = self._remote
        with self._lock:
            held = tuple((h.claim.epoch, h.index, h.claimed_at) for h in self._held.values())
            done = {e: frozenset(s) for e, s in self._done.items()}
            others = [self._unabandoned(x) for x in leases if x.owner != self._owner]
        board = Board(
            len(self._shards),
            get_dht_time(),
            (*others, Lease(self._owner, self._peer, float("inf"), held)),
            (
                *(x for x in dones if x.owner != self._owner),
                Done(self._owner, self._peer, self._epoch - 1, done),
            ),
        )
        self._observe(board, leases)
        return board

    def _unabandoned(self, lease: Lease) -> Lease:
        """`lease` without the claims its owner has held longer than `max_hold_s` as timed here (the
        first sighting counts, not the claim time the owner wrote). Called with `_lock` held."""
        now, keep = time.monotonic(), []
        for e, i, t in lease.claims:
            key = (lease.owner, e, i)
            if now - self._claim_seen.setdefault(key, now) < self._timing.max_hold_s:
                keep.append((e, i, t))
            elif key not in self._abandoned:
                self._abandoned.add(key)
                logger.warning(
                    "run %s: peer %s has held shard %s of epoch %d for over %.0f s without finishing it: "
                    "treating its claim as abandoned (the shard may be read twice)",
                    self._run_id, lease.peer, self._shards[i], e, self._timing.max_hold_s,
                )  # fmt: skip
        return lease if len(keep) == len(lease.claims) else dataclasses.replace(lease, claims=tuple(keep))

    def _observe(self, board: Board, leases: list[Lease]) -> None:
        """Log what changed: the epoch, being alone, clocks that disagree."""
        epoch = current_epoch(board)
        if epoch != self._epoch:
            if self._epoch >= 0 and epoch > self._epoch:
                logger.info("run %s: epoch %d complete, epoch %d begins", self._run_id, epoch - 1, epoch)
            elif self._epoch < 0 and epoch > 0:
                logger.info("run %s: joining at epoch %d", self._run_id, epoch)
            with self._lock:
                self._epoch = epoch
                for old in [e for e in self._done if e < epoch - 1]:
                    del self._done[old]  # kept small: epochs before the previous one are settled
                for key in [k for k in self._claim_seen if k[1] < epoch - 1]:
                    del self._claim_seen[key]
                self._abandoned = {k for k in self._abandoned if k[1] >= epoch - 1}
        others = len(board.live_peers()) - 1
        alone = self._dht is None or not self._reachable or others == 0
        if alone != self._alone:
            if alone:
                why = "no other peer of this run is visible"
                if self._dht is None or not self._reachable:
                    why = "no DHT" if self._dht is None else "the DHT is unreachable"
                level = logging.INFO if self._dht is not None and self._reachable else logging.WARNING
                logger.log(
                    level, "run %s: %s: reading every shard alone (single-peer mode)", self._run_id, why
                )
            elif self._alone is not None:
                logger.info("run %s: %d other peer(s) visible: sharing the shards", self._run_id, others)
            self._alone = alone
        for lease in leases:
            if lease.owner in self._skewed or lease.owner == self._owner or lease.expires <= board.now:
                continue
            offset = clock_offset(lease.written, now=board.now, max_age=lease.expires - lease.written)
            if offset is not None:
                self._skewed.add(lease.owner)
                logger.warning(
                    "peer %s wrote its record %+.1f s from our clock: synchronize clocks (NTP), "
                    "or claims will collide and leases expire early",
                    lease.peer,
                    offset,
                )

    def _note_bad(self, bad: list[tuple[bytes, float]]) -> None:
        new = set(bad) - self._bad
        if new:
            self._bad |= new
            logger.warning("run %s: ignored %d malformed record(s) from other peers", self._run_id, len(new))

    def _set_reachable(self, reachable: bool, error: BaseException | None = None) -> None:
        if reachable != self._reachable:
            if reachable:
                logger.info("run %s: the DHT answers again", self._run_id)
            else:
                logger.warning("run %s: the DHT is unreachable (%r)", self._run_id, error)
        self._reachable = reachable

    # ---- publishing -------------------------------------------------------------------------------

    def _publish(self, *, leaving: bool = False) -> bool:
        """Write this peer's whole record: claims renewed for `lease_s` (none when leaving), done shards."""
        with self._lock:
            now = get_dht_time()
            if self._held and 0 < self._lease_until < now:
                logger.warning(
                    "run %s: this peer's lease lapsed %.1f s ago (renewal late): others may read its shards too",
                    self._run_id,
                    now - self._lease_until,
                )
            self._lease_until = now if leaving else now + self._lease_s
            # for one subkey the later expiration wins: keep them increasing
            self._expiration = expiration = max(now + self._timing.done_ttl_s, self._expiration + 1e-3)
            self._renewed, self._changed = time.monotonic(), float("inf")
            record = dict(
                peer=self._peer,
                fp=self._fp,
                time=now,
                lease_until=self._lease_until,
                claims=[dict(e=h.claim.epoch, i=h.index, t=h.claimed_at) for h in self._held.values()],
                complete=max(self._epoch - 1, -1),
                done=[dict(e=e, shards=sorted(s)) for e, s in sorted(self._done.items())],
            )
        try:
            started = time.monotonic()
            with self._dht_lock:
                future = self._dht.store(
                    self._key, record, expiration, subkey=self._owner, return_future=True
                )
            stored = future.result(timeout=self._timing.request_timeout_s)
            self._store_s += 0.3 * (time.monotonic() - started - self._store_s)
            if stored:
                return True
            logger.debug("run %s: our record was not stored", self._run_id)
        except Exception as e:
            self._set_reachable(False, e)
        return False

    def _renew(self) -> None:
        """The renewal thread: rewrite the record every `lease_s / 3`, and within `poll_s` of a change
        (a busy peer's next claim round usually publishes it first, saving a write per shard)."""
        while not self._closed.is_set():
            with self._lock:
                due = min(self._renewed + self._lease_s / 3, self._changed + self._timing.poll_s)
            if self._wake.wait(max(0.0, due - time.monotonic())):
                self._wake.clear()
                continue  # recompute when it is due
            if not self._closed.is_set():
                self._publish()
