"""Where the run's lease records live in the DHT: every peer's are read, this peer's is written.

`RecordStore` is all the claim protocol asks of storage, in the terms of `hivetrain.leases` (`Lease`,
`Done`), not of DHT keys. `SingleKeyStore` keeps every peer's record under one key, `<run_id>_shards`, in a
subkey signed with the peer's key, so one `get` reads the whole run: right for tens of peers. A store for
hundreds would spread the records over several keys (by shard range or epoch) and read only those the
peer claims from, behind the same interface.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import hivemind
from hivemind.utils import get_dht_time

from ..dht import ensure_run_validators
from ..leases import Done, Lease, parse_records, shard_list_fingerprint

logger = logging.getLogger(__name__)

OwnRecord = Callable[[float], tuple[Lease, Done]]
"""Builds this peer's record as of a DHT time; `RecordStore.write` calls it at the moment of writing."""


@dataclass(frozen=True)
class Records:
    """What one read found: every peer's leases and done lists (this peer's as stored), and the
    `(subkey, expiration)` of records that make no sense."""

    leases: tuple[Lease, ...] = ()
    dones: tuple[Done, ...] = ()
    malformed: tuple[tuple[bytes, float], ...] = ()


class RecordStore(Protocol):
    """The DHT as the claim protocol sees it: read everyone's records, write one's own."""

    reachable: bool
    """False from a failed read or write until a read succeeds."""
    store_s: float
    """How long a write takes lately (seconds): a claim settles for twice that before it is re-read."""

    @property
    def peer(self) -> str:
        """This peer's name in records and logs."""

    def open(self) -> bytes:
        """Get ready to read and write (the run's validators installed); returns this peer's owner key."""

    def read(self, *, max_age: float = 0.0) -> Records:
        """Every peer's records, fetched unless the last fetch is under `max_age` s old; none if that fails."""

    def write(self, record: OwnRecord) -> bool:
        """Write this peer's record as `record(now)` builds it; whether the DHT took it.

        Records built by concurrent writes must reach the DHT newest last: the store builds each one under
        the lock that orders its writes."""


class SingleKeyStore:
    """Every peer's record under the run's one key, `<run_id>_shards`, one signed subkey per peer.

    Args:
        dht: a running DHT.
        run_id: the run's name, the key's prefix.
        shards: the split's shard names (records made for another list count as malformed).
        ttl_s: how long a record outlives its last write.
        timeout_s: a DHT call slower than this counts as the DHT being unreachable.
    """

    def __init__(
        self, dht: hivemind.DHT, *, run_id: str, shards: Sequence[str], ttl_s: float, timeout_s: float
    ):
        self._dht, self._run_id, self._key = dht, run_id, f"{run_id}_shards"
        self._n, self._fp = len(shards), shard_list_fingerprint(shards)
        self._ttl_s, self._timeout_s = ttl_s, timeout_s
        self._lock = threading.Lock()  # one call into the DHT's pipe at a time; orders the writes
        self._owner, self._expiration = b"", 0.0
        self._records, self._fetched = Records(), float("-inf")
        self.reachable, self.store_s = True, 0.0

    @functools.cached_property
    def peer(self) -> str:
        return self._dht.peer_id.to_base58()

    def open(self) -> bytes:
        self._owner = ensure_run_validators(self._dht, self._run_id)
        return self._owner

    def read(self, *, max_age: float = 0.0) -> Records:
        if time.monotonic() - self._fetched <= max_age:
            return self._records
        records = Records()
        try:
            with self._lock:
                future = self._dht.get(self._key, latest=True, return_future=True)
            value = future.result(timeout=self._timeout_s)
            leases, dones, bad = parse_records(value, n=self._n, fp=self._fp, now=get_dht_time())
            records = Records(tuple(leases), tuple(dones), tuple(bad))
            self._set_reachable(True)
        except Exception as e:  # a dead DHT process, a closed pipe, a timeout: carry on alone
            self._set_reachable(False, e)
        self._records, self._fetched = records, time.monotonic()
        return records

    def write(self, record: OwnRecord) -> bool:
        try:
            started = time.monotonic()
            with self._lock:
                now = get_dht_time()
                value = _peer_record(*record(now), fp=self._fp)
                # for one subkey the later expiration wins: keep them increasing
                self._expiration = expiration = max(now + self._ttl_s, self._expiration + 1e-3)
                future = self._dht.store(self._key, value, expiration, subkey=self._owner, return_future=True)
            stored = future.result(timeout=self._timeout_s)
            self.store_s += 0.3 * (time.monotonic() - started - self.store_s)
            if stored:
                return True
            logger.debug("run %s: our record was not stored", self._run_id)
        except Exception as e:
            self._set_reachable(False, e)
        return False

    def _set_reachable(self, reachable: bool, error: BaseException | None = None) -> None:
        if reachable != self.reachable:
            if reachable:
                logger.info("run %s: the DHT answers again", self._run_id)
            else:
                logger.warning("run %s: the DHT is unreachable (%r)", self._run_id, error)
        self.reachable = reachable


def _peer_record(lease: Lease, done: Done, *, fp: str) -> dict:
    """The `hivetrain.dht.PeerRecord` that `parse_records` reads back as `lease` and `done`."""
    return dict(
        peer=lease.peer,
        fp=fp,
        time=lease.written,
        lease_until=lease.expires,
        claims=[dict(e=e, i=i, t=t) for e, i, t in lease.claims],
        complete=done.complete,
        done=[dict(e=e, shards=sorted(s)) for e, s in sorted(done.shards.items())],
    )
