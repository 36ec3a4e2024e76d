"""Dividing each epoch's shards among the peers of a run through signed leases in the hivemind DHT.

No coordinator: every peer publishes two records under its own signed subkey (see `hivetrain.dht`):

* `<run_id>_lease`: the shards it is reading, `(epoch, index, claim time)`, renewed every `lease_s / 3`
  and expiring `lease_s` after the last renewal, so a dead peer's shards come free within `lease_s`;
* `<run_id>_done`: the shards it finished in the epochs still open and the last epoch it saw complete;
  kept for hours, so a joining peer learns the current epoch and what is left.

A peer reads both, picks at random among the first few free shards of the epoch's order (a permutation
seeded by run id, seed and epoch that all peers compute alike), publishes its claim, re-reads after a short
settle and backs off if an earlier claim (then the lower key) holds the same shard: the DHT has no
compare-and-swap. When the current epoch has no free shard left, peers start the next one rather than idle,
but never run more than two epochs ahead of the oldest unfinished one, and shards of the older epoch whose
leases expire are taken first. Work is taken, never pre-assigned, so a faster peer reads more shards.

The decision itself (`Board`, `current_epoch`, `choose`, `confirmed`) is pure and is tested without a DHT;
`ShardAssigner` adds the DHT reads and writes, the renewal thread and the `shards.jsonl` log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
from hivemind.utils import get_dht_time

from .dht import DoneRecord, LeaseRecord, clock_offset, ensure_run_validators

logger = logging.getLogger(__name__)

WINDOW = 2
"""Epochs open at once: the oldest unfinished one and the next (so peers do not idle at an epoch's end)."""


@dataclass(frozen=True)
class Claim:
    """A shard this peer holds under lease in one epoch."""

    epoch: int
    shard: str


@dataclass(frozen=True)
class Lease:
    """One peer's published claims, as `(epoch, index, claim time)`, valid until `expires` (DHT time)."""

    owner: bytes
    peer: str
    expires: float
    claims: tuple[tuple[int, int, float], ...]
    written: float = 0.0


@dataclass(frozen=True)
class Done:
    """One peer's finished shards per open epoch and the last epoch it saw complete."""

    owner: bytes
    peer: str
    complete: int
    shards: Mapping[int, frozenset[int]]


@dataclass(frozen=True)
class Board:
    """Everything the run's peers published, as seen at DHT time `now`."""

    n: int
    now: float
    leases: tuple[Lease, ...] = ()
    dones: tuple[Done, ...] = ()

    def done(self, epoch: int) -> dict[int, str]:
        """Finished shards of `epoch` -> the peer that reported it first."""
        out: dict[int, str] = {}
        for record in self.dones:
            for index in record.shards.get(epoch, ()):
                out.setdefault(index, record.peer)
        return out

    def holders(self, epoch: int) -> dict[int, tuple[float, bytes, str]]:
        """Shards of `epoch` under a live lease -> the winning `(claim time, owner, peer)`."""
        out: dict[int, tuple[float, bytes, str]] = {}
        for lease in self.leases:
            if lease.expires <= self.now:
                continue
            for e, index, t in lease.claims:
                if e == epoch and (index not in out or (t, lease.owner) < out[index][:2]):
                    out[index] = (t, lease.owner, lease.peer)
        return out

    def live_peers(self) -> set[bytes]:
        return {lease.owner for lease in self.leases if lease.expires > self.now}


@dataclass(frozen=True)
class Next:
    """What to do now: `claim` shard `index` of `epoch`, `wait` for shards in flight, or `finished`."""

    kind: str
    epoch: int
    index: int | None = None


def shard_order(run_id: str, seed: int, epoch: int, n: int) -> list[int]:
    """The order of an epoch's shards, the same on every peer: a permutation seeded by run, seed, epoch."""
    digest = hashlib.sha256(f"{run_id}\0{seed}\0{epoch}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def current_epoch(board: Board) -> int:
    """The oldest epoch not yet complete: past every epoch a peer saw complete and every fully done one."""
    epoch = max((record.complete for record in board.dones), default=-1) + 1
    while len(board.done(epoch)) >= board.n:
        epoch += 1
    return epoch


def choose(
    board: Board,
    order: Callable[[int], Sequence[int]],
    *,
    rng: random.Random,
    spread: int = 8,
    max_epochs: int | None = None,
) -> Next:
    """The next shard to claim: at random among the first `spread` free ones of the oldest open epoch."""
    base = current_epoch(board)
    if max_epochs is not None and base >= max_epochs:
        return Next("finished", base)
    for epoch in range(base, base + WINDOW):
        if max_epochs is not None and epoch >= max_epochs:
            break
        done, held = board.done(epoch), board.holders(epoch)
        free = [i for i in order(epoch) if i not in done and i not in held]
        if free:
            return Next("claim", epoch, rng.choice(free[: max(spread, 1)]))
    return Next("wait", base)


def confirmed(board: Board, owner: bytes, epoch: int, index: int) -> bool:
    """Whether `owner`'s claim on the shard stands: nobody finished it and no earlier claim exists."""
    holder = board.holders(epoch).get(index)
    return index not in board.done(epoch) and holder is not None and holder[1] == owner


def parse_leases(value, *, n: int, fp: str, now: float) -> tuple[list[Lease], list[tuple[bytes, float]]]:
    """Leases from a DHT `get` result; also the `(subkey, expiration)` of records that make no sense."""
    leases, bad = [], []
    for subkey, item in _entries(value):
        try:
            record = LeaseRecord.parse_obj(item.value)
            claims = tuple((c.e, c.i, c.t) for c in record.claims)
            if record.fp != fp or any(i >= n or t > now + 60 for _, i, t in claims):
                raise ValueError("another shard list, an index out of range or a claim from the future")
            leases.append(Lease(subkey, record.peer, item.expiration_time, claims, record.time))
        except Exception:
            bad.append((subkey, item.expiration_time))
    return leases, bad


def parse_dones(value, *, n: int, fp: str) -> tuple[list[Done], list[tuple[bytes, float]]]:
    """Done records from a DHT `get` result; also those that make no sense."""
    dones, bad = [], []
    for subkey, item in _entries(value):
        try:
            record = DoneRecord.parse_obj(item.value)
            shards = {d.e: frozenset(d.shards) for d in record.done}
            if record.fp != fp or any(i >= n for s in shards.values() for i in s):
                raise ValueError("another shard list or an index out of range")
            dones.append(Done(subkey, record.peer, record.complete, shards))
        except Exception:
            bad.append((subkey, item.expiration_time))
    return dones, bad


def _entries(value):
    if value is None:
        return []
    if not isinstance(value.value, dict):
        return [(b"", value)]
    return [(subkey, item) for subkey, item in value.value.items()]


def shard_list_fingerprint(shards: Sequence[str]) -> str:
    """A short hash of the shard list: peers with different manifests under one run id ignore each other."""
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LeaseTiming:
    """How quickly claims are confirmed, renewed and re-read (seconds).

    Attributes:
        settle_s: wait between publishing a claim and re-reading it (covers the spread of DHT store times).
        poll_s: re-read interval while every shard is in flight elsewhere.
        done_ttl_s: how long done records live (must outlast the longest epoch).
        request_timeout_s: a DHT call slower than this counts as the DHT being unreachable.
    """

    settle_s: float = 0.5
    poll_s: float = 1.0
    done_ttl_s: float = 6 * 3600.0
    request_timeout_s: float = 10.0


@dataclass
class _Held:
    claim: Claim
    index: int
    claimed_at: float  # DHT time, the tie-break
    start: float  # wall clock, for shards.jsonl
    finishing: bool = False  # completed, kept in the lease until the done record is published


@dataclass
class _Mine:
    """This peer's own records, the authority for its subkeys whatever the DHT returns."""

    held: dict[tuple[int, int], _Held] = field(default_factory=dict)
    done: dict[int, set[int]] = field(default_factory=dict)
    done_dirty: bool = False
    lease_exp: float = 0.0
    done_exp: float = 0.0


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
        run_id: the run's name; prefixes the DHT keys.
        lease_s: a claim not renewed for this long is taken over by others (renewed every `lease_s / 3`).
        seed: with `run_id` and the epoch, seeds the shard order every peer agrees on.
        log_dir: where `shards.jsonl` gets one line per finished shard (epoch, shard, start, end, samples, peer).
        max_epochs: `next_claim` returns None once this many epochs are complete; None: no end.
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
        timing: LeaseTiming = LeaseTiming(),
        rng: random.Random | None = None,
    ):
        if not shards:
            raise ValueError("no shards to assign")
        if len(set(shards)) != len(shards):
            raise ValueError("shard names must be unique")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self._shards, self._index = list(shards), {name: i for i, name in enumerate(shards)}
        self._dht, self._run_id, self._seed = dht, run_id, seed
        self._lease_s, self._timing, self._max_epochs = lease_s, timing, max_epochs
        self._keys = (f"{run_id}_lease", f"{run_id}_done")
        self._fp = shard_list_fingerprint(self._shards)
        self._rng = rng or random.Random(os.urandom(8))
        self._lock, self._dht_lock, self._log_lock = threading.RLock(), threading.Lock(), threading.Lock()
        self._closed, self._wake = threading.Event(), threading.Event()
        self._mine = _Mine()
        self._orders: dict[int, list[int]] = {}
        self._epoch, self._alone, self._reachable = -1, None, True
        self._bad: set[tuple[bytes, float]] = set()
        self._skewed: set[bytes] = set()
        self.lost_races = 0
        if dht is not None:
            self._owner = ensure_run_validators(dht, run_id)
            self._peer = dht.peer_id.to_base58()
        else:
            self._owner, self._peer = b"[local]", "local"
        self._log = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._log = open(Path(log_dir) / "shards.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._board = self._read()
        self._thread = None
        if dht is not None:
            self._publish_lease()  # a heartbeat: others count this peer from now on
            self._thread = threading.Thread(target=self._run, name=f"ShardAssigner({run_id})", daemon=True)
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
            return [h.claim for h in self._mine.held.values() if not h.finishing]

    def next_claim(self, timeout: float | None = None) -> Claim | None:
        """Claim the next free shard; several claims may be held at once (prefetch).

        Blocks while no shard is free but some are still in flight. Returns None on timeout, after
        `close()`, or when `max_epochs` epochs are complete.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed.is_set():
            board = self._read()
            peers = len(board.live_peers())
            spread = 1 if self.single_peer else 2 * peers  # alone: exactly the epoch's order
            step = choose(board, self._order, rng=self._rng, spread=spread, max_epochs=self._max_epochs)
            if step.kind == "finished":
                return None
            if step.kind == "claim":
                claim = self._try_claim(step.epoch, step.index)
                if claim is not None:
                    return claim
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._closed.wait(self._timing.poll_s if left is None else min(self._timing.poll_s, left))
        return None

    def complete(self, claim: Claim, samples: int) -> None:
        """Record `claim` as read: a done record in the DHT and a line in `shards.jsonl`."""
        end = time.time()
        with self._lock:
            key = (claim.epoch, self._index.get(claim.shard, -1))
            held = self._mine.held.get(key)
            if held is None or held.finishing:
                raise ValueError(f"shard {claim.shard} of epoch {claim.epoch} is not held by this peer")
            self._mine.done.setdefault(claim.epoch, set()).add(key[1])
            self._mine.done_dirty = True
            if self._dht is None:
                del self._mine.held[key]
            else:
                held.finishing = True  # stays in the lease until the done record is out
        line = dict(
            epoch=claim.epoch, shard=claim.shard, start=held.start, end=end, samples=samples, peer=self._peer
        )
        if self._log is not None:
            with self._log_lock:
                self._log.write(json.dumps(line) + "\n")
                self._log.flush()
        self._wake.set()

    def release(self, claim: Claim) -> None:
        """Give an unfinished shard back at once, for others (or this peer) to read."""
        with self._lock:
            key = (claim.epoch, self._index.get(claim.shard, -1))
            held = self._mine.held.get(key)
            if held is None or held.finishing:
                return
            del self._mine.held[key]
        self._wake.set()

    def epoch_state(self, epoch: int | None = None) -> dict[str, dict]:
        """Per shard of `epoch` (default: the current one): `state` done/claimed/free and `holder` peer id."""
        board = self._read()
        epoch = current_epoch(board) if epoch is None else epoch
        done, held = board.done(epoch), board.holders(epoch)
        state = {}
        for i, name in enumerate(self._shards):
            if i in done:
                state[name] = {"state": "done", "holder": done[i]}
            elif i in held:
                state[name] = {"state": "claimed", "holder": held[i][2]}
            else:
                state[name] = {"state": "free", "holder": None}
        return state

    def close(self) -> None:
        """Publish what was finished, give back the shards still held, stop the renewal thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for key in [k for k, h in self._mine.held.items() if not h.finishing]:
                del self._mine.held[key]
        if self._dht is not None:
            self._flush()
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

    def _try_claim(self, epoch: int, index: int) -> Claim | None:
        """Publish a claim, re-read after the settle time, keep it only if it is the earliest."""
        claim = Claim(epoch, self._shards[index])
        with self._lock:
            self._mine.held[(epoch, index)] = _Held(claim, index, get_dht_time(), time.time())
        if self._dht is None:
            return claim
        self._publish_lease()
        if self._closed.wait(self._timing.settle_s):
            return None  # close() gives the claim back
        if confirmed(self._read(), self._owner, epoch, index):
            logger.debug("claimed shard %s of epoch %d", claim.shard, epoch)
            return claim
        with self._lock:
            self._mine.held.pop((epoch, index), None)
        self.lost_races += 1
        logger.debug("another peer claimed shard %s of epoch %d first; trying another", claim.shard, epoch)
        self._publish_lease()
        return None

    # ---- reading the board ------------------------------------------------------------------------

    def _read(self) -> Board:
        """Every peer's records from the DHT, with this peer's own records as they are in memory."""
        leases: list[Lease] = []
        dones: list[Done] = []
        if self._dht is not None:
            try:
                with self._dht_lock:
                    futures = [self._dht.get(key, latest=True, return_future=True) for key in self._keys]
                lease_value, done_value = (f.result(timeout=self._timing.request_timeout_s) for f in futures)
                now, n = get_dht_time(), len(self._shards)
                leases, bad_leases = parse_leases(lease_value, n=n, fp=self._fp, now=now)
                dones, bad_dones = parse_dones(done_value, n=n, fp=self._fp)
                self._note_bad(bad_leases + bad_dones)
                self._set_reachable(True)
            except Exception as e:  # a dead DHT process, a closed pipe, a timeout: carry on alone
                self._set_reachable(False, e)
        with self._lock:
            mine = self._mine
            own_lease = Lease(
                self._owner,
                self._peer,
                float("inf"),
                tuple((h.claim.epoch, h.index, h.claimed_at) for h in mine.held.values()),
            )
            done = {e: frozenset(s) for e, s in mine.done.items()}
            own_done = Done(self._owner, self._peer, max(self._epoch - 1, -1), done)
        board = Board(
            len(self._shards),
            get_dht_time(),
            (*(x for x in leases if x.owner != self._owner), own_lease),
            (*(x for x in dones if x.owner != self._owner), own_done),
        )
        self._observe(board, leases)
        return board

    def _observe(self, board: Board, leases: list[Lease]) -> None:
        """Log what changed: the epoch, being alone, records that make no sense, clocks that disagree."""
        epoch = current_epoch(board)
        if epoch != self._epoch:
            if self._epoch >= 0 and epoch > self._epoch:
                logger.info("run %s: epoch %d complete, epoch %d begins", self._run_id, epoch - 1, epoch)
            elif self._epoch < 0 and epoch > 0:
                logger.info("run %s: joining at epoch %d", self._run_id, epoch)
            with self._lock:
                self._epoch = epoch
                for old in [e for e in self._mine.done if e < epoch - 1]:
                    del self._mine.done[old]
                self._mine.done_dirty = self._mine.done_dirty or self._dht is not None
        others = len(board.live_peers()) - 1
        alone = self._dht is None or not self._reachable or others == 0
        if alone != self._alone:
            if alone:
                why = "no DHT" if self._dht is None else "no other peer of this run is visible"
                if self._dht is not None and not self._reachable:
                    why = "the DHT is unreachable"
                level = logging.INFO if self._dht is not None and self._reachable else logging.WARNING
                logger.log(
                    level, "run %s: %s: reading every shard alone (single-peer mode)", self._run_id, why
                )
            elif self._alone is not None:
                logger.info("run %s: %d other peer(s) visible: sharing the shards", self._run_id, others)
            self._alone = alone
        for lease in leases:
            if lease.owner in self._skewed or lease.owner == self._owner:
                continue
            offset = clock_offset(lease.written, now=board.now, max_age=lease.expires - lease.written)
            if offset is not None:
                self._skewed.add(lease.owner)
                logger.warning(
                    "peer %s wrote its lease %+.1f s from our clock: synchronize clocks (NTP), "
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

    def _store(self, key: str, value: dict, expiration: float) -> bool:
        try:
            with self._dht_lock:
                future = self._dht.store(key, value, expiration, subkey=self._owner, return_future=True)
            return bool(future.result(timeout=self._timing.request_timeout_s))
        except Exception as e:
            self._set_reachable(False, e)
            return False

    def _publish_lease(self) -> bool:
        with self._lock:
            now = get_dht_time()
            if self._mine.held and 0 < self._mine.lease_exp < now:
                logger.warning(
                    "run %s: this peer's lease lapsed %.1f s ago (renewal late): others may read its shards too",
                    self._run_id,
                    now - self._mine.lease_exp,
                )
            self._mine.lease_exp = expiration = max(now + self._lease_s, self._mine.lease_exp + 1e-3)
            claims = [dict(e=h.claim.epoch, i=h.index, t=h.claimed_at) for h in self._mine.held.values()]
            value = dict(peer=self._peer, fp=self._fp, time=now, claims=claims)
        ok = self._store(self._keys[0], value, expiration)
        if not ok:
            logger.debug("run %s: lease renewal was not stored", self._run_id)
        return ok

    def _flush(self) -> None:
        """Publish new done records, then drop the finished shards from the lease and renew it."""
        with self._lock:
            dirty, self._mine.done_dirty = self._mine.done_dirty, False
            finishing = [key for key, h in self._mine.held.items() if h.finishing]
            now = get_dht_time()
            self._mine.done_exp = expiration = max(now + self._timing.done_ttl_s, self._mine.done_exp + 1e-3)
            done = [dict(e=e, shards=sorted(s)) for e, s in sorted(self._mine.done.items())]
            value = dict(peer=self._peer, fp=self._fp, time=now, complete=max(self._epoch - 1, -1), done=done)
        if dirty:
            if self._store(self._keys[1], value, expiration):
                with self._lock:
                    for key in finishing:
                        self._mine.held.pop(key, None)
            else:
                with self._lock:
                    self._mine.done_dirty = True
        self._publish_lease()

    def _run(self) -> None:
        """The renewal thread: republish the lease every `lease_s / 3`, and at once after a change."""
        while not self._closed.is_set():
            self._wake.wait(self._lease_s / 3)
            self._wake.clear()
            if self._closed.is_set():
                break
            self._flush()
