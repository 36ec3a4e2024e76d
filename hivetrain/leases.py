"""The lease decision, pure: given every peer's published records and the time, which shard is next.

No DHT here: `parse_records` turns a DHT reply into `Lease` and `Done` records, a `Board` holds them as
seen at one moment, and `current_epoch`, `choose` and `confirmed` decide. Every peer computes the same
`shard_order` for an epoch, so they agree on the order without talking. `hivetrain.assign` does the DHT
reads and writes around these functions; the monitor reads the same records through them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from .dht import PeerRecord

WINDOW = 2
"""Epochs open at once: the oldest unfinished one and the next (so peers do not idle at an epoch's end)."""


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
    epoch = max([0, *(record.complete + 1 for record in board.dones)])
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
    skip: Collection[tuple[int, int]] = (),
) -> Next:
    """The next shard to claim: at random among the first `spread` free ones of the oldest open epoch.

    `skip` holds `(epoch, index)` pairs to treat as taken (those picked earlier in the same round)."""
    base = current_epoch(board)
    if max_epochs is not None and base >= max_epochs:
        return Next("finished", base)
    for epoch in range(base, base + WINDOW):
        if max_epochs is not None and epoch >= max_epochs:
            break
        done, held = board.done(epoch), board.holders(epoch)
        free = [i for i in order(epoch) if i not in done and i not in held and (epoch, i) not in skip]
        if free:
            return Next("claim", epoch, rng.choice(free[: max(spread, 1)]))
    return Next("wait", base)


def confirmed(board: Board, owner: bytes, epoch: int, index: int) -> bool:
    """Whether `owner`'s claim on the shard stands: nobody finished it and no earlier claim exists."""
    holder = board.holders(epoch).get(index)
    return index not in board.done(epoch) and holder is not None and holder[1] == owner


def parse_records(
    value, *, n: int, fp: str, now: float
) -> tuple[list[Lease], list[Done], list[tuple[bytes, float]]]:
    """Leases and done records from a DHT `get` of the run's key, and the `(subkey, expiration)` of
    records that make no sense (another shard list, an index out of range, a claim from the future)."""
    leases, dones, bad = [], [], []
    entries = value.value.items() if value is not None and isinstance(value.value, dict) else ()
    for owner, item in entries:
        try:
            record = PeerRecord.parse_obj(item.value)
            claims = tuple((c.e, c.i, c.t) for c in record.claims)
            shards = {d.e: frozenset(d.shards) for d in record.done}
            if record.fp != fp:
                raise ValueError("another shard list")
            if any(i >= n or t > now + 60 for _, i, t in claims) or any(
                i >= n for s in shards.values() for i in s
            ):
                raise ValueError("a shard index out of range or a claim from the future")
            leases.append(Lease(owner, record.peer, record.lease_until, claims, record.time))
            dones.append(Done(owner, record.peer, record.complete, shards))
        except Exception:
            bad.append((owner, item.expiration_time))
    return leases, dones, bad


def shard_list_fingerprint(shards: Sequence[str]) -> str:
    """A short hash of the shard list: peers with different manifests under one run id ignore each other."""
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]
