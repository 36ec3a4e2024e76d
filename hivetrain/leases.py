"""The lease decision, pure: given every peer's published records and the time, which shard is next.

No DHT here: `parse_records` turns a DHT reply into `Lease` and `Done` records, a `Board` holds them as
seen at one moment, and `current_epoch`, `choose` and `confirmed` decide; `position` is what a checkpoint
keeps of the data, to resume a run that stopped whole. Every peer computes the same `shard_order` for an
epoch, so they agree on the order without talking.

So that a claim's cost does not grow with the swarm, an epoch's order is cut into buckets of
`BUCKET_SIZE` shards (`bucket_shards`), each with its own records: a claim round reads and writes one or
two buckets (`plan_views` says which), never the whole run, and a bucket found with nothing to claim
(`bucket_state`) is left alone until its claims may have lapsed. `hivetrain.assign` does the DHT reads and
writes around these functions; the monitor and `bench/swarm_sim.py` run the same ones.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from .dht import PeerRecord

WINDOW = 2
"""Epochs open at once: the oldest unfinished one and the next (so peers do not idle at an epoch's end)."""

BUCKET_SIZE = 32
"""Shards per bucket: a bucket's records (its readers' claims and done shards) are all a claim reads."""

PEERS_PER_BUCKET = 4
"""Peers claiming from one bucket at a time, about (`front`)."""


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

    def claims(self, epoch: int) -> dict[int, list[tuple[float, bytes, str]]]:
        """Shards of `epoch` under a live lease -> their `(claim time, owner, peer)`, earliest first."""
        out: dict[int, list[tuple[float, bytes, str]]] = {}
        for lease in self.leases:
            if lease.expires <= self.now:
                continue
            for e, index, t in lease.claims:
                if e == epoch:
                    out.setdefault(index, []).append((t, lease.owner, lease.peer))
        return {index: sorted(held) for index, held in out.items()}

    def holders(self, epoch: int) -> dict[int, tuple[float, bytes, str]]:
        """Shards of `epoch` under a live lease -> the winning (earliest) `(claim time, owner, peer)`."""
        return {index: held[0] for index, held in self.claims(epoch).items()}

    def live_peers(self) -> set[bytes]:
        return {lease.owner for lease in self.leases if lease.expires > self.now}


@dataclass(frozen=True)
class Next:
    """What to do now: `claim` shard `index` of `epoch`, `wait` for shards in flight, or `finished`.

    A `backup` claim is a second reader for a straggler: a shard that another peer has held for too long
    while nothing else of its epoch is left."""

    kind: str
    epoch: int
    index: int | None = None
    backup: bool = False


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
    me: bytes = b"",
    late_s: float | None = None,
) -> Next:
    """The next shard to claim: at random among the first `spread` free ones of the oldest open epoch.

    `skip` holds `(epoch, index)` pairs to treat as taken (those picked earlier in the same round). When the
    oldest epoch has no free shard left, a shard of it that another peer (not `me`) has held for over
    `late_s` seconds gets a backup reader before the next epoch's shards: the epoch ends when its last
    shard is read, and the next epoch but one cannot open before, so one slow peer would hold up the run."""
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
        if (
            epoch == base
            and late_s is not None
            and (late := stragglers(board, epoch, late_s, me=me, skip=skip))
        ):
            return Next("claim", epoch, late[0], backup=True)
    return Next("wait", base)


def stragglers(
    board: Board, epoch: int, late_s: float, *, me: bytes = b"", skip: Collection[tuple[int, int]] = ()
) -> list[int]:
    """Shards of `epoch` that one peer other than `me` has held for over `late_s`, oldest claim first (a
    shard that already has a backup reader gets no other)."""
    done, late = board.done(epoch), []
    for index, held in board.claims(epoch).items():
        (t, owner, _), *others = held
        if (
            index not in done
            and not others
            and owner != me
            and board.now - t > late_s
            and (epoch, index) not in skip
        ):
            late.append((t, index))
    return [index for _, index in sorted(late)]


def late_after(hold_s: Sequence[float], *, factor: float = 3.0, least_s: float = 0.0) -> float | None:
    """How long another peer may hold a shard before it counts as a straggler: `factor` times the median
    time the run's recent shards stayed claimed (claim to finish, read-ahead queues included), so that
    peers of ordinary speed (volunteers' GPUs differ 2-3x) are not backed up, and never less than
    `least_s` (a pause of an averaging round is no reason to read a shard twice); None until three
    shards are timed."""
    if len(hold_s) < 3:
        return None
    return max(least_s, factor * sorted(hold_s)[len(hold_s) // 2])


def shard_states(board: Board, epoch: int) -> list[tuple[str, str | None]]:
    """Per shard of `epoch`, in manifest order: its state (done, claimed, backup: claimed by a straggler's
    second reader too, or free) and the peer that finished or first claimed it (None when free). The
    assigner's `epoch_state` and the monitor's grid both show this."""
    done, held = board.done(epoch), board.claims(epoch)

    def state(i: int) -> tuple[str, str | None]:
        if i in done:
            return "done", done[i]
        if i in held:
            return ("backup" if len(held[i]) > 1 else "claimed"), held[i][0][2]
        return "free", None

    return [state(i) for i in range(board.n)]


@dataclass(frozen=True)
class Position:
    """Where the run's data stands: its current epoch and, per open epoch, the shards already done."""

    epoch: int
    done: Mapping[int, frozenset[int]]


def bucket_count(n: int, size: int = BUCKET_SIZE) -> int:
    """How many buckets an epoch of `n` shards has."""
    return -(-n // size)


def bucket_shards(order: Sequence[int], bucket: int, size: int = BUCKET_SIZE) -> Sequence[int]:
    """The shards of `bucket`: a slice of the epoch's order, so a peer alone reads the order exactly."""
    return order[bucket * size : (bucket + 1) * size]


def bucket_state(
    board: Board,
    epoch: int,
    shards: Collection[int],
    *,
    me: bytes = b"",
    late_s: float | None = None,
    skip: Collection[tuple[int, int]] = (),
) -> str:
    """What a bucket of `epoch` holding `shards` offers, as `board` shows it: "complete" (every shard
    done), "open" (a free shard, or a straggler to back up), or "exhausted" (every shard done or held,
    `skip` counted as held: nothing to claim until a claim lapses)."""
    done, held = board.done(epoch), board.holders(epoch)
    if all(i in done for i in shards):
        return "complete"
    if any(i not in done and i not in held and (epoch, i) not in skip for i in shards):
        return "open"
    if late_s is not None and set(stragglers(board, epoch, late_s, me=me, skip=skip)) & set(shards):
        return "open"
    return "exhausted"


def front(peers: int) -> int:
    """How many of an epoch's first open buckets a swarm of `peers` claims from at once: enough that a
    few peers share a bucket (they rarely pick the same shard), few enough that the buckets being read
    are those where a dead peer's claims lapse, so they are found within about a lease (a bucket chosen
    at random among all of an epoch's, as at first, was read again a minute or more after)."""
    return max(1, -(-peers // PEERS_PER_BUCKET))


def plan_views(
    epochs: Sequence[int],
    count: int,
    complete: Mapping[int, Collection[int]],
    exhausted: Mapping[int, Mapping[int, float]],
    *,
    now: float,
    recheck_s: float,
    rng: random.Random,
    spread: int | None = None,
    stay: tuple[int, int] | None = None,
) -> list[tuple[int, int]]:
    """The `(epoch, bucket)`s a claim round reads, in the order it claims from them.

    The target is the bucket `stay` (the one the last round claimed from) while it is open, else at
    random among the first `spread` buckets (None: all) of the oldest of the open `epochs` with buckets
    neither `complete` nor `exhausted` (found with nothing to claim, at the time given): a peer that
    stays in its bucket until it is exhausted leaves its done shards in few buckets, so a bucket holds
    the records of a few peers, not of every peer that passed by. Before it comes the bucket of the
    oldest epoch found exhausted longest ago, if over `recheck_s` ago: a dead peer's claims lapse there,
    and one extra read per round finds them within about a lease whatever the number of buckets. Empty:
    nothing to read until a recheck is due."""
    views: list[tuple[int, int]] = []
    for epoch in epochs:
        done, seen = complete.get(epoch, ()), exhausted.get(epoch, {})
        stale = sorted((t, b) for b, t in seen.items() if b not in done and now - t > recheck_s)
        if stale and not views:
            views.append((epoch, stale[0][1]))
        fresh = [b for b in range(count) if b not in done and b not in seen]
        if fresh:
            stays = stay is not None and stay[0] == epoch and stay[1] in fresh
            views.append(stay if stays else (epoch, rng.choice(fresh[: spread or len(fresh)])))
            break
    return views


def position(board: Board) -> Position:
    """The run's data position on `board`: what a checkpoint records, to resume a stopped run from."""
    base = current_epoch(board)
    done = {e: frozenset(board.done(e)) for e in range(base, base + WINDOW)}
    return Position(base, {e: shards for e, shards in done.items() if shards})


def confirmed(board: Board, owner: bytes, epoch: int, index: int, *, backup: bool = False) -> bool:
    """Whether `owner`'s claim on the shard stands: nobody finished it and no earlier claim exists (for a
    backup claim: at most one, the straggler's)."""
    owners = [held[1] for held in board.claims(epoch).get(index, ())]
    return index not in board.done(epoch) and owner in owners[: 2 if backup else 1]


def parse_records(
    value, *, n: int, fp: str, now: float, within: Callable[[int, int], bool] | None = None
) -> tuple[list[Lease], list[Done], list[tuple[bytes, float]]]:
    """Leases and done records from a DHT `get` of a bucket's key, and the `(subkey, expiration)` of
    records that make no sense (another shard list, an index out of range or, when `within(epoch, index)`
    is given, outside the bucket read, a claim from the future)."""
    leases, dones, bad = [], [], []
    entries = value.value.items() if value is not None and isinstance(value.value, dict) else ()
    for owner, item in entries:
        if not isinstance(owner, bytes) or b"[owner:" not in owner:
            continue  # unsigned: no peer's record (the DHT's validators drop these, but not every node has them)
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
            if within is not None and not all(
                within(e, i)
                for e, i in [*((e, i) for e, i, _ in claims), *((e, i) for e, s in shards.items() for i in s)]
            ):
                raise ValueError("a shard of another bucket")
            leases.append(Lease(owner, record.peer, record.lease_until, claims, record.time))
            dones.append(Done(owner, record.peer, record.complete, shards))
        except Exception:
            bad.append((owner, item.expiration_time))
    return leases, dones, bad


def shard_list_fingerprint(shards: Sequence[str]) -> str:
    """A short hash of the shard list: peers with different manifests under one run id ignore each other."""
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]
