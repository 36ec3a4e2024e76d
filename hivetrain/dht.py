"""A hivemind DHT for one training run: signed, typed records and failures explained in one line.

Every hivetrain component (trainer, shard assignment, monitor) joins the run through `make_dht`, which
installs the run's record validators before the node bootstraps:

* `RSASignatureValidator`: a record whose subkey holds `[owner:<public key>]` can only be written by the
  holder of that key, so one peer cannot erase or overwrite another's records;
* `SchemaValidator` over `RunRecords` (prefix = run id) and `ShardKeysValidator` for the per-epoch shard
  keys: the DHT itself drops records of the wrong shape, whoever sends them;
* `SizeValidator`: records larger than their schema's `max_record_bytes` are dropped before anything
  parses them (one oversized record would otherwise slow every peer's every read of the key).

hivemind's own errors for the usual set-up mistakes (an address without `/p2p/`, no peer listening there,
clocks more than 3 s apart) are turned into `PeerError` with the cause and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import ClassVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils import MAX_DHT_TIME_DISCREPANCY_SECONDS, MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr
from pydantic.v1 import BaseModel, StrictFloat, conint, conlist, constr

from .errors import PeerError
from .options import LOOPBACK_MADDR

logger = logging.getLogger(__name__)

CLOCK_TOLERANCE_S = float(MAX_DHT_TIME_DISCREPANCY_SECONDS)
"""hivemind refuses peers whose clocks differ by more than this (seconds)."""

_PeerName = constr(strict=True, max_length=128)
_Index = conint(strict=True, ge=0)


class ClaimEntry(BaseModel):
    """One shard held under lease: epoch `e`, shard index `i` (manifest order), claim time `t` (DHT time)."""

    e: _Index
    i: _Index
    t: StrictFloat


class EpochDone(BaseModel):
    """The shards (indices) a peer finished in epoch `e`."""

    e: _Index
    shards: conlist(_Index, max_items=1_000_000)


class PeerRecord(BaseModel):
    """A peer's part of one bucket of an epoch (key `bucket_key`), rewritten whole at every change there and
    at every lease renewal while it holds claims there.

    Its claims hold until `lease_until` (DHT time); a record with done shards lives for hours, so the
    shards a peer finished still count after it is gone. One record per peer and bucket makes finishing
    a shard atomic: it moves from `claims` to `done` in one write. (`complete` is unused: -1.)
    """

    peer: constr(strict=True, max_length=128)
    fp: constr(strict=True, max_length=32)
    time: StrictFloat
    lease_until: StrictFloat
    claims: conlist(ClaimEntry, max_items=4096)
    complete: conint(strict=True, ge=-1)
    done: conlist(EpochDone, max_items=16)


class BucketMarks(BaseModel):
    """The buckets of one epoch a peer found complete (every shard done), under key `<run_id>_shards_e<E>`."""

    peer: _PeerName
    fp: constr(strict=True, max_length=32)
    buckets: conlist(_Index, max_items=100_000)


class EpochMark(BaseModel):
    """The last epoch a peer found complete, under key `<run_id>_shards_epochs` (a joiner starts after it)."""

    peer: _PeerName
    fp: constr(strict=True, max_length=32)
    complete: conint(strict=True, ge=-1)


class RunRecords(BaseModel):
    """Key `<run_id>_shards_epochs`: one `EpochMark` per peer that saw an epoch complete first, under its
    `[owner:...]` subkey. The per-epoch keys (buckets and their marks) are checked by `ShardKeysValidator`."""

    max_record_bytes: ClassVar[int] = 4 << 10
    shards_epochs: dict[BytesWithPublicKey, EpochMark]


def bucket_key(run_id: str, epoch: int, bucket: int) -> str:
    """The key of one bucket of an epoch: the `PeerRecord`s of the peers that claim from it."""
    return f"{run_id}_shards_e{epoch}_b{bucket}"


def marks_key(run_id: str, epoch: int) -> str:
    """The key of an epoch's `BucketMarks`."""
    return f"{run_id}_shards_e{epoch}"


class ShardKeysValidator(RecordValidatorBase):
    """Checks the records under a run's per-epoch shard keys: a signed subkey, the right shape, a bounded size.

    hivemind's `SchemaValidator` knows a fixed set of keys (it sees only their hashes), and a run has new
    keys every epoch, so the assigner adds each epoch's keys (`add`) before it reads or writes them.
    Records under keys not added yet pass (as hivemind's schema lets unknown keys pass); readers parse
    what they get all the same.
    """

    MAX_BYTES: ClassVar[int] = 32 << 10
    """A bucket's record lists at most a bucket of claims and done shards: far less than this."""

    def __init__(self, run_id: str):
        self._run_id = run_id
        self._models: dict[bytes, type[BaseModel]] = {}
        self._epochs: set[tuple[int, int]] = set()

    def add(self, epochs: Iterable[int], buckets: int) -> None:
        """Know the keys of `epochs` (each with `buckets` buckets)."""
        for epoch in epochs:
            if (epoch, buckets) in self._epochs:
                continue
            self._epochs.add((epoch, buckets))
            self._models[DHTID.generate(source=marks_key(self._run_id, epoch)).to_bytes()] = BucketMarks
            for bucket in range(buckets):
                key = DHTID.generate(source=bucket_key(self._run_id, epoch, bucket)).to_bytes()
                self._models[key] = PeerRecord

    def validate(self, record: DHTRecord) -> bool:
        model = self._models.get(record.key)
        if model is None:
            return True
        if len(record.value) > self.MAX_BYTES or b"[owner:" not in (record.subkey or b""):
            return False
        try:
            model.parse_obj(MSGPackSerializer.loads(record.value))
        except Exception:
            return False
        return True

    @property
    def priority(self) -> int:
        return 5  # after the signature check, which strips the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, ShardKeysValidator) or other._run_id != self._run_id:
            return False
        self._models.update(other._models)
        self._epochs |= other._epochs
        return True


def add_epoch_keys(dht: hivemind.DHT, run_id: str, epochs: Iterable[int], buckets: int) -> None:
    """Have `dht` check the records under the shard keys of `epochs` (`ShardKeysValidator`)."""
    dht.run_coroutine(partial(_add_epoch_keys, run_id=run_id, epochs=tuple(epochs), buckets=buckets))


async def _add_epoch_keys(_dht: hivemind.DHT, node, run_id: str, epochs, buckets: int) -> None:
    validator = ShardKeysValidator(run_id)
    validator.add(epochs, buckets)
    node.protocol.record_validator.extend([validator])


class SizeValidator(RecordValidatorBase):
    """Refuses values larger than a limit under the given keys, as received (signature included).

    Runs before the other validators: hivemind's schema check parses the whole value with pydantic at
    every node, on every store and every read, so a hostile peer's one-megabyte record made each read of
    the run's shard records thirty times slower.
    """

    def __init__(self, limits: Mapping[str, int]):
        self._limits = {DHTID.generate(source=key).to_bytes(): limit for key, limit in limits.items()}

    def validate(self, record: DHTRecord) -> bool:
        limit = self._limits.get(record.key)
        return limit is None or len(record.value) <= limit

    @property
    def priority(self) -> int:
        return 20  # before the signature check (10), which strips the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, SizeValidator):
            return False
        self._limits.update(other._limits)
        return True


def run_validators(
    run_id: str, *, schemas: Iterable[type[BaseModel]] = (), private_key: RSAPrivateKey | None = None
) -> list[RecordValidatorBase]:
    """Signature, size and schema validators for `run_id`; `schemas` add other components' record types
    (a schema's `max_record_bytes` class variable, if it has one, caps the size of its records).

    The default key is hivemind's process-wide one, which `hivemind.Optimizer`'s progress tracker also
    signs with: give every peer of one process the same key, or each DHT its own `private_key` (tests).
    """
    schemas = (RunRecords, *schemas)
    limits = {
        f"{run_id}_{field}": schema.max_record_bytes
        for schema in schemas
        if hasattr(schema, "max_record_bytes")
        for field in schema.__fields__
    }
    validators: list[RecordValidatorBase] = [RSASignatureValidator(private_key), SizeValidator(limits)]
    validators += [SchemaValidator(schema, prefix=run_id) for schema in schemas]
    return validators


def make_dht(
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = (LOOPBACK_MADDR,),
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
    identity_path: str | Path | None = None,
    use_auto_relay: bool = False,
    start: bool = True,
    run_id: str | None = None,
    schemas: Iterable[type[BaseModel]] = (),
    private_key: RSAPrivateKey | None = None,
    tries: int = 3,
    retry_delay_s: float = 2.0,
    **dht_kwargs,
) -> hivemind.DHT:
    """Start (or prepare, with `start=False`) a DHT node with the run's validators.

    Args:
        initial_peers: full multiaddrs of running peers (`/ip4/HOST/tcp/PORT/p2p/PEER_ID`); empty: first peer.
        host_maddrs: where to listen; loopback by default, `/ip4/0.0.0.0/tcp/PORT` for other machines.
        announce_maddrs: the addresses others should dial (behind NAT or port forwarding).
        client_mode: a node that serves no requests (for peers that cannot accept connections).
        identity_path: a private key file that fixes the peer id across restarts (created if missing).
        use_auto_relay: reach this node through relays when it is behind NAT.
        run_id: installs `RunRecords` (and `schemas`) under this prefix; None: signatures only.
        private_key: the key that signs this peer's records (see `run_validators`).
        tries, retry_delay_s: attempts to reach `initial_peers` before giving up with PeerError.
        dht_kwargs: passed on to `hivemind.DHT` (and from there to DHTNode and P2P).

    Raises:
        PeerError: a malformed address, no initial peer reachable after `tries`, clocks too far apart.
    """
    for address in initial_peers:
        _check_address(address)
    validators = (
        run_validators(run_id, schemas=schemas, private_key=private_key)
        if run_id is not None
        else [RSASignatureValidator(private_key)]
    )
    kwargs = dict(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        client_mode=client_mode,
        use_auto_relay=use_auto_relay,
        record_validators=validators,
        **dht_kwargs,
    )
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path is not None:
        kwargs["identity_path"] = str(identity_path)
    if not start:
        return hivemind.DHT(start=False, **kwargs)
    for attempt in range(1, max(tries, 1) + 1):
        try:
            return hivemind.DHT(start=True, **kwargs)
        except Exception as e:  # hivemind raises plain RuntimeError & co. from its child process
            error = explain_start_failure(e, initial_peers=initial_peers, identity_path=identity_path)
            if not _unreachable(e) or attempt >= tries:
                raise error from e
            logger.warning("%s (try %d of %d; retrying in %.0f s)", error, attempt, tries, retry_delay_s)
            time.sleep(retry_delay_s)
    raise AssertionError("unreachable")  # the loop returns or raises


def _check_address(address: str) -> None:
    try:
        parsed = Multiaddr(address)
        parsed["p2p"]
    except Exception:
        raise PeerError(
            f"initial peer {address!r} is not a full multiaddr: expected /ip4/HOST/tcp/PORT/p2p/PEER_ID "
            "(as printed by the running peer)"
        ) from None


def _unreachable(e: BaseException) -> bool:
    text = str(e)
    return "bootstrap" in text and ("failed to connect" in text or "none of the initial_peers" in text)


def explain_start_failure(
    e: BaseException, *, initial_peers: Sequence[str] = (), identity_path: str | Path | None = None
) -> PeerError:
    """A one-line PeerError for an exception hivemind raised while starting a DHT node."""
    text = str(e)
    if _unreachable(e):
        peers = ", ".join(initial_peers)
        return PeerError(
            f"could not reach any initial peer ({peers}): check that a peer of this run is running there "
            "and that its address and port are reachable from this machine"
        )
    if "local time must be within" in text:
        return PeerError(
            f"this machine's clock differs from the other peers' by more than {CLOCK_TOLERANCE_S:.0f} s "
            f"({text.strip()}): synchronize the clock (NTP, e.g. `timedatectl set-ntp true`) and retry"
        )
    if identity_path is not None and ("identity" in text.lower() or "cannot parse" in text):
        return PeerError(
            f"{identity_path}: cannot use this identity file ({text.strip()}): point identity_path at a key "
            "file written by hivemind, or at a new path to create one"
        )
    return PeerError(f"cannot start the DHT node: {type(e).__name__}: {text.strip() or 'no details'}")


def clock_offset(remote_time: float, *, now: float, max_age: float) -> float | None:
    """An estimate of how far a peer's clock is off, or None when `remote_time` looks plausible.

    `remote_time` is a timestamp the peer wrote at most `max_age` seconds ago by its clock (a renewed record).
    A timestamp from the future, or older than `max_age`, means the clocks differ by at least that much.
    """
    if remote_time > now + CLOCK_TOLERANCE_S:
        return remote_time - now
    if remote_time < now - max_age - CLOCK_TOLERANCE_S:
        return remote_time - (now - max_age)
    return None


def signing_key(dht: hivemind.DHT) -> bytes | None:
    """The `[owner:...]` key this DHT node signs with, or None when it has no RSASignatureValidator."""
    return dht.run_coroutine(_signing_key)


async def _signing_key(_dht: hivemind.DHT, node) -> bytes | None:
    # The composite validator keeps its parts private; hivemind is pinned (==1.1.12) in pyproject.
    for validator in getattr(node.protocol.record_validator, "_validators", ()):
        if isinstance(validator, RSASignatureValidator):
            return validator.local_public_key
    return None


def ensure_run_validators(
    dht: hivemind.DHT, run_id: str, *, schemas: Iterable[type[BaseModel]] = ()
) -> bytes:
    """Install the run's validators (with `schemas`, as in `run_validators`) on a running DHT unless
    `make_dht(run_id=...)` did; returns its key."""
    return dht.run_coroutine(partial(_ensure_run_validators, run_id=run_id, schemas=tuple(schemas)))


async def _ensure_run_validators(_dht: hivemind.DHT, node, run_id: str, schemas=()) -> bytes:
    composite = node.protocol.record_validator
    key_id = SchemaValidator(RunRecords, prefix=run_id)._key_id_to_field_name
    known = any(
        isinstance(v, SchemaValidator) and key_id.keys() <= v._key_id_to_field_name.keys()
        for v in composite._validators
    )
    if not known:
        composite.extend(
            run_validators(run_id, schemas=schemas)
        )  # an existing RSASignatureValidator keeps its key
    return await _signing_key(_dht, node)


def visible_addresses(dht: hivemind.DHT) -> list[str]:
    """The multiaddrs other peers can pass as `initial_peers` to join through this node."""
    return [str(address) for address in dht.get_visible_maddrs()]


REJOIN_PERIOD_S = 20.0
"""How often a peer checks that its initial peers are still in its routing table (one local lookup)."""


class Rejoiner:
    """Puts this node back in touch with its initial peers whenever they drop out of its routing table.

    hivemind bootstraps from `initial_peers` once: a peer whose link was down for a minute has dropped
    every other node from its routing table (and they it), and the two halves never find each other
    again. hivemind has no re-bootstrap, so this thread pings the missing initial peers (which puts each
    in the other's table), then looks up its own id to find the rest of the run through them.
    """

    def __init__(self, dht: hivemind.DHT, initial_peers: Sequence[str], *, period_s: float = REJOIN_PERIOD_S):
        self._dht, self._period_s = dht, period_s
        self._peers = [(PeerID.from_base58(Multiaddr(a)["p2p"]), Multiaddr(a)) for a in initial_peers]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dht-rejoin", daemon=True)
        self.rejoined = 0
        """How many times a missing initial peer answered again."""

    def start(self) -> Rejoiner:
        if self._peers:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                found = self._dht.run_coroutine(partial(_rejoin, peers=self._peers))
            except Exception as e:  # the DHT is shutting down or its process is gone
                logger.debug("rejoin check failed: %r", e)
                continue
            if found:
                self.rejoined += found
                logger.info("back in touch with %d initial peer(s) of the run", found)


async def _rejoin(_dht: hivemind.DHT, node, peers) -> int:
    protocol = node.protocol
    missing = [(peer_id, maddr) for peer_id, maddr in peers if peer_id not in protocol.routing_table]
    found = 0
    for peer_id, maddr in missing:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(node.p2p._client.connect(peer_id, [maddr]), timeout=protocol.wait_timeout)
        if await protocol.call_ping(peer_id) is not None:
            found += 1
    if found:
        await node.find_nearest_nodes([node.node_id])
    return found
