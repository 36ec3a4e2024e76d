"""Where the run's lease records live in the DHT: one key per bucket of an epoch, read a bucket at a time.

`RecordStore` is all the claim protocol asks of storage, in the terms of `hivetrain.leases` (`Lease`,
`Done`, buckets), not of DHT keys. `BucketStore` keeps them so that no read grows with the swarm:

* `<run_id>_shards_e<E>_b<B>`: the records of the peers that claim from bucket B of epoch E, one signed
  subkey per peer (`hivetrain.dht.PeerRecord`, that bucket's part of the peer's claims and done shards);
  a bucket has 32 shards, so a few tens of records, however many peers the run has;
* `<run_id>_shards_e<E>`: the buckets of E found complete (`BucketMarks`), a record per marking peer;
* `<run_id>_shards_epochs`: the last epoch found complete (`EpochMark`), written by the peer that saw it
  first, so that a joiner knows where the run is without reading old epochs.

Every call counts its DHT requests and the bytes of the values (`Traffic`), for the benchmarks.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import hivemind
from hivemind.utils import MSGPackSerializer, get_dht_time

from ..dht import BucketMarks, EpochMark, add_epoch_keys, bucket_key, ensure_run_validators, marks_key
from ..leases import Done, Lease, parse_records, shard_list_fingerprint

logger = logging.getLogger(__name__)

OwnRecord = Callable[[float], tuple[Lease, Done]]
"""Builds this peer's record as of a DHT time; `RecordStore.write` calls it at the moment of writing."""

View = tuple[int, int]
"""One bucket of one epoch: `(epoch, bucket)`."""


@dataclass(frozen=True)
class Progress:
    """The run's progress as marked in the DHT: the last epoch found complete, and per epoch asked about,
    the buckets found complete."""

    floor: int = -1
    complete: dict[int, frozenset[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Records:
    """What one read found: the leases and done lists of the buckets read (this peer's as stored), and
    the `(subkey, expiration)` of records that make no sense."""

    leases: tuple[Lease, ...] = ()
    dones: tuple[Done, ...] = ()
    malformed: tuple[tuple[bytes, float], ...] = ()
    progress: Progress | None = None
    """The run's marks, when the read asked for them."""

    def __add__(self, other: Records) -> Records:
        return Records(
            self.leases + other.leases,
            self.dones + other.dones,
            self.malformed + other.malformed,
            self.progress or other.progress,
        )


@dataclass
class Traffic:
    """DHT requests made and value bytes moved (as the DHT hands them over: signatures not counted)."""

    gets: int = 0
    stores: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class RecordStore(Protocol):
    """The DHT as the claim protocol sees it: read buckets and marks, write one's own records and marks."""

    reachable: bool
    """False from a failed read or write until a read succeeds."""
    store_s: float
    """How long a write takes lately (seconds): a claim settles for twice that before it is re-read."""
    traffic: Traffic

    @property
    def peer(self) -> str:
        """This peer's name in records and logs."""

    def open(self) -> bytes:
        """Get ready to read and write (the run's validators installed); returns this peer's owner key."""

    def read(
        self,
        views: Iterable[View],
        *,
        max_age: float = 0.0,
        marks_of: Iterable[int] | None = None,
        marks_age: float = 0.0,
    ) -> Records:
        """Every peer's records in the buckets `views`, each fetched unless fetched under `max_age` s ago;
        with `marks_of`, also `progress(marks_of, max_age=marks_age)`, in the same round of requests."""

    def write(self, record: OwnRecord) -> bool:
        """Write this peer's record as `record(now)` builds it, to each bucket where it changed or holds
        claims to renew; whether the DHT took every write.

        Records built by concurrent writes must reach the DHT newest last: the store builds each one under
        the lock that orders its writes."""

    def progress(self, epochs: Iterable[int], *, max_age: float = 0.0) -> Progress:
        """The last epoch marked complete, and the buckets of `epochs` marked complete."""

    def mark(self, epoch: int, buckets: Iterable[int], *, epoch_complete: bool = False) -> None:
        """Mark `buckets` of `epoch` complete (and, with `epoch_complete`, the epoch)."""


class BucketStore:
    """Records in one key per bucket of an epoch (see the module's docstring).

    Args:
        dht: a running DHT.
        run_id: the run's name, the keys' prefix.
        shards: the split's shard names (records made for another list count as malformed).
        bucket_of: `(epoch, shard index) -> bucket` (the slices of each epoch's order).
        buckets: how many buckets an epoch has.
        ttl_s: how long a record with done shards, and a mark, outlives its last write.
        timeout_s: a DHT call slower than this counts as the DHT being unreachable.
    """

    EPOCH_KEYS_AHEAD = 4
    """Epochs whose keys are added to the DHT's validator at a time."""

    def __init__(
        self,
        dht: hivemind.DHT,
        *,
        run_id: str,
        shards: Sequence[str],
        bucket_of: Callable[[int, int], int],
        buckets: int,
        ttl_s: float,
        timeout_s: float,
    ):
        self._dht, self._run_id = dht, run_id
        self._n, self._fp = len(shards), shard_list_fingerprint(shards)
        self._bucket_of, self._buckets = bucket_of, buckets
        self._ttl_s, self._timeout_s = ttl_s, timeout_s
        self._lock = threading.Lock()  # one call into the DHT's pipe at a time; orders the writes
        self._owner = b""
        self._written: dict[View, tuple] = {}  # per bucket: (claims, done) as last written
        self._unsent: set[View] = set()  # buckets whose last write failed
        self._expiration: dict[str, float] = {}  # per key: our subkey's last expiration
        self._fetched: dict[str, tuple[float, object]] = {}  # per key: (monotonic time, DHT value)
        self._marked: dict[int, set[int]] = {}  # buckets this peer marked, per epoch
        self._keyed: set[int] = set()  # epochs whose keys are in the DHT's validator
        self.reachable, self.store_s, self.traffic = True, 0.0, Traffic()

    @functools.cached_property
    def peer(self) -> str:
        return self._dht.peer_id.to_base58()

    def open(self) -> bytes:
        self._owner = ensure_run_validators(self._dht, self._run_id)
        return self._owner

    # ---- reading --------------------------------------------------------------------------------

    def read(
        self,
        views: Iterable[View],
        *,
        max_age: float = 0.0,
        marks_of: Iterable[int] | None = None,
        marks_age: float = 0.0,
    ) -> Records:
        views = list(dict.fromkeys(views))
        epochs = None if marks_of is None else list(marks_of)
        if views or epochs:
            with self._lock:
                self._ensure_keys([*(e for e, _ in views), *(epochs or ())])
        keys = {view: bucket_key(self._run_id, *view) for view in views}
        wanted = dict.fromkeys(keys.values(), max_age)
        if epochs is not None:
            wanted.update(dict.fromkeys(self._marks_keys(epochs), marks_age))
        values = self._get(wanted)
        records, now = Records(), get_dht_time()
        for view, key in keys.items():
            if (value := values[key]) is not None:
                within = functools.partial(self._within, view)
                leases, dones, bad = parse_records(value, n=self._n, fp=self._fp, now=now, within=within)
                records += Records(tuple(leases), tuple(dones), tuple(bad))
        if epochs is not None:
            records += Records(progress=self._progress(epochs, values))
        return records

    def _within(self, view: View, epoch: int, index: int) -> bool:
        return epoch == view[0] and self._bucket_of(epoch, index) == view[1]

    def progress(self, epochs: Iterable[int], *, max_age: float = 0.0) -> Progress:
        return self.read((), marks_of=epochs, marks_age=max_age).progress

    def _marks_keys(self, epochs: Sequence[int]) -> list[str]:
        return [f"{self._run_id}_shards_epochs", *(marks_key(self._run_id, e) for e in epochs)]

    def _progress(self, epochs: Sequence[int], values: dict[str, object]) -> Progress:
        floor_value, *mark_values = (values[key] for key in self._marks_keys(epochs))
        floor = max([-1, *(m.complete for m in self._parse(floor_value, EpochMark))])
        complete = {
            epoch: frozenset(
                b for m in self._parse(value, BucketMarks) for b in m.buckets if b < self._buckets
            )
            for epoch, value in zip(epochs, mark_values, strict=True)
        }
        return Progress(floor, complete)

    def _parse(self, value, model) -> list:
        out = []
        entries = value.value.items() if value is not None and isinstance(value.value, dict) else ()
        for _, item in entries:
            try:
                record = model.parse_obj(item.value)
            except Exception:
                continue
            if record.fp == self._fp:
                out.append(record)
        return out

    def _get(self, keys: dict[str, float]) -> dict[str, object]:
        """The DHT values of `keys` (None where absent), fetched at once, but for those fetched less than
        `keys[key]` seconds ago."""
        now, values, wanted = time.monotonic(), {}, []
        for key, max_age in keys.items():
            cached = self._fetched.get(key)
            if cached is not None and now - cached[0] <= max_age:
                values[key] = cached[1]
            else:
                wanted.append(key)
        if wanted:
            try:
                with self._lock:
                    futures = [self._dht.get(key, latest=True, return_future=True) for key in wanted]
                fetched = [future.result(timeout=self._timeout_s) for future in futures]
                self._set_reachable(True)
            except Exception as e:  # a dead DHT process, a closed pipe, a timeout: carry on alone
                self._set_reachable(False, e)
                fetched = [None] * len(wanted)
            self.traffic.gets += len(wanted)
            self.traffic.bytes_read += sum(_value_bytes(value) for value in fetched)
            for key, value in zip(wanted, fetched, strict=True):
                values[key] = value
                self._fetched[key] = (time.monotonic(), value)
            if len(self._fetched) > 256:  # old epochs' buckets: never read again
                for key in sorted(self._fetched, key=lambda k: self._fetched[k][0])[:128]:
                    del self._fetched[key]
        return values

    # ---- writing --------------------------------------------------------------------------------

    def write(self, record: OwnRecord) -> bool:
        try:
            started = time.monotonic()
            with self._lock:
                now = get_dht_time()
                lease, done = record(now)
                writes = [(view, self._store(*item)) for view, *item in self._changed(lease, done, now)]
            stored = True
            for view, future in writes:
                try:
                    ok = future.result(timeout=self._timeout_s)
                except Exception as e:
                    ok = False
                    self._set_reachable(False, e)
                if not ok:  # written again at the next write, changed or not: a lost done shard is read twice
                    stored = False
                    with self._lock:
                        self._unsent.add(view)
            if writes:
                self.store_s += 0.3 * (time.monotonic() - started - self.store_s)
            if not stored:
                logger.debug("run %s: a record of ours was not stored", self._run_id)
            return stored
        except Exception as e:
            self._set_reachable(False, e)
        return False

    def _changed(self, lease: Lease, done: Done, now: float) -> list[tuple[View, str, dict, float]]:
        """The `(bucket, key, value, expiration)` to write: every bucket where this peer holds claims
        (renewed), where its part changed since the last write, or whose last write failed (called with
        `_lock` held)."""
        claims: dict[View, list] = {}
        for e, i, t in lease.claims:
            claims.setdefault((e, self._bucket_of(e, i)), []).append((e, i, t))
        finished: dict[View, set[int]] = {}
        for e, shards in done.shards.items():
            for i in shards:
                finished.setdefault((e, self._bucket_of(e, i)), set()).add(i)
        had_claims = [view for view, (held, _) in self._written.items() if held]
        unsent, self._unsent = self._unsent, set()
        out = []
        for view in dict.fromkeys([*claims, *had_claims, *finished, *sorted(unsent)]):
            before = self._written.get(view, ((), frozenset()))
            # done shards stay done: the assigner forgets old epochs' ones, their record stands
            part = (tuple(claims.get(view, ())), frozenset(finished.get(view, ())) | before[1])
            if part == self._written.get(view) and not part[0] and view not in unsent:
                continue
            self._written[view] = part
            self._ensure_keys([view[0]])
            value = dict(
                peer=lease.peer,
                fp=self._fp,
                time=lease.written,
                lease_until=lease.expires,
                claims=[dict(e=e, i=i, t=t) for e, i, t in part[0]],
                complete=-1,
                done=[dict(e=view[0], shards=sorted(part[1]))] if part[1] else [],
            )
            # a record with only claims (or none: withdrawn) is gone soon after its lease
            expires = now + self._ttl_s if part[1] else max(lease.expires, now) + 1.0
            out.append((view, bucket_key(self._run_id, *view), value, expires))
        newest = max((e for e, _ in self._written), default=0)
        for view in [v for v, (held, _) in self._written.items() if not held and v[0] < newest - 2]:
            if view not in self._unsent:
                del self._written[view]  # a settled epoch: never written again
        return out

    def mark(self, epoch: int, buckets: Iterable[int], *, epoch_complete: bool = False) -> None:
        with self._lock:
            marked = self._marked.setdefault(epoch, set())
            new = set(buckets) - marked
            writes = []
            if new:
                marked |= new
                value = dict(peer=self.peer, fp=self._fp, buckets=sorted(marked))
                writes.append((marks_key(self._run_id, epoch), value, get_dht_time() + self._ttl_s))
            if epoch_complete:
                value = dict(peer=self.peer, fp=self._fp, complete=epoch)
                writes.append((f"{self._run_id}_shards_epochs", value, get_dht_time() + self._ttl_s))
            for old in [e for e in self._marked if e < epoch - 2]:
                del self._marked[old]
            self._ensure_keys([epoch])
            futures = [self._store(*item) for item in writes]
        try:
            for future in futures:
                future.result(timeout=self._timeout_s)
        except Exception as e:
            self._set_reachable(False, e)

    def _store(self, key: str, value: dict, expiration: float):
        """Start one write of our subkey under `key` (called with `_lock` held)."""
        # for one subkey the later expiration wins: keep them increasing
        expiration = max(expiration, self._expiration.get(key, 0.0) + 1e-3)
        self._expiration[key] = expiration
        if len(self._expiration) > 1024:
            for old in sorted(self._expiration, key=self._expiration.get)[:512]:
                del self._expiration[old]
        self.traffic.stores += 1
        self.traffic.bytes_written += len(MSGPackSerializer.dumps(value)) + len(self._owner)
        return self._dht.store(key, value, expiration, subkey=self._owner, return_future=True)

    def _ensure_keys(self, epochs: Iterable[int]) -> None:
        """Have the DHT check the records under the keys of `epochs`, adding the next few epochs' with
        any missing (called with `_lock` held)."""
        missing = [e for e in epochs if e not in self._keyed]
        if missing:
            new = [
                e for e in range(min(missing), max(missing) + self.EPOCH_KEYS_AHEAD) if e not in self._keyed
            ]
            add_epoch_keys(self._dht, self._run_id, new, self._buckets)
            self._keyed.update(new)
            self._keyed -= {e for e in self._keyed if e < max(self._keyed) - 4 * self.EPOCH_KEYS_AHEAD}

    def _set_reachable(self, reachable: bool, error: BaseException | None = None) -> None:
        if reachable != self.reachable:
            if reachable:
                logger.info("run %s: the DHT answers again", self._run_id)
            else:
                logger.warning("run %s: the DHT is unreachable (%r)", self._run_id, error)
        self.reachable = reachable


def _value_bytes(value) -> int:
    """The bytes of a DHT value as the DHT hands it over: each subkey and its serialized record."""
    if value is None or not isinstance(value.value, dict):
        return 0
    return sum(len(k) + len(MSGPackSerializer.dumps(item.value)) for k, item in value.value.items())
