"""The claim protocol at 64 to 1,024 peers: hivetrain's own ShardAssigner over a simulated DHT.

    .venv/bin/python bench/swarm_sim.py [--peers 8 64 256 1024] [--shards 1250] [--read 6] [--lease 12] [--scale 0.25 1 4 8]

Every peer is a real `hivetrain.assign.ShardAssigner` with its real `BucketStore` (claim rounds, renewal
thread, records split over buckets, marks), all in this one process; only the DHT is simulated, because
a thousand hivemind processes do not fit on one machine: one in-memory table of keys and signed
subkeys, where a get answers after `--rtt` times the lookup hops of a Kademlia DHT of that size
(log2(peers) / 3, hivemind's parallel lookups), a store lands after as long, and `--loss` of the stores
are lost. Peers read a shard by sleeping: peer 0 three times faster than the rest, peer 1 `--slow`
times slower, and beyond peer 7 speeds drawn from a Pareto distribution (shape 2.5: most near the
median, a few far slower or faster); peer 3 dies at `--kill-at` s (its DHT goes silent, it writes
nothing more) while it holds shards, and a peer joins at `--join-at` s. The scenario and every row but
the last three are `bench/assign.py`'s own, so the simulated swarm at 8 peers can be checked against
that benchmark's real DHTs. The last rows are the DHT requests and value bytes (as the store counts
them, signatures not included) per shard claimed: flat in the number of peers if claims scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import os
import platform
import queue
import random
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.assign import RUN_ID, SLOW, VICTIM, metrics, shard_names


class Clockwork:
    """One thread that completes futures at their due times (a Timer per request would be thousands)."""

    def __init__(self):
        self._due: list[tuple[float, int, object]] = []
        self._cond, self._count = threading.Condition(), 0
        threading.Thread(target=self._run, daemon=True, name="sim-clock").start()

    def at(self, delay: float, fn) -> None:
        with self._cond:
            self._count += 1
            heapq.heappush(self._due, (time.monotonic() + delay, self._count, fn))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._cond.wait(None if not self._due else self._due[0][0] - time.monotonic())
                _, _, fn = heapq.heappop(self._due)
            fn()


@dataclasses.dataclass
class Item:
    value: object
    expiration_time: float


class SimDHT:
    """The swarm's DHT as one table: key -> subkey -> (value, expiration); the later expiration wins."""

    def __init__(self, *, hop_s: float, hops: int, loss: float, seed: int):
        self.table: dict[str, dict[bytes, Item]] = {}
        self._lock, self._clock = threading.Lock(), Clockwork()
        self._hop_s, self._hops, self._loss = hop_s, hops, loss
        self._rng = random.Random(seed)

    def _delay(self) -> float:
        with self._lock:
            return self._hop_s * self._hops * self._rng.uniform(0.5, 1.5)

    def get(self, key: str) -> Future:
        future = Future()

        def answer():
            now = time.time()
            with self._lock:
                live = {s: i for s, i in self.table.get(key, {}).items() if i.expiration_time > now}
            future.set_result(Item(live, max(i.expiration_time for i in live.values())) if live else None)

        self._clock.at(self._delay(), answer)
        return future

    def store(self, key: str, subkey: bytes, value, expiration: float) -> Future:
        future = Future()
        with self._lock:
            lost = self._rng.random() < self._loss

        def land():
            with self._lock:
                entries = self.table.setdefault(key, {})
                old = entries.get(subkey)
                if lost or (old is not None and old.expiration_time >= expiration):
                    future.set_result(False)
                    return
                entries[subkey] = Item(value, expiration)
            future.set_result(True)

        self._clock.at(self._delay(), land)
        return future


class SimNode:
    """One peer's handle on the simulated DHT, shaped like the parts of `hivemind.DHT` the store uses."""

    def __init__(self, dht: SimDHT, name: str):
        self._dht, self.name, self.dead = dht, name, False
        self.peer_id = types.SimpleNamespace(to_base58=lambda: name)

    def get(self, key, latest=True, return_future=True) -> Future:
        return self._dead() if self.dead else self._dht.get(key)

    def store(self, key, value, expiration, subkey=None, return_future=True) -> Future:
        return self._dead() if self.dead else self._dht.store(key, subkey, value, expiration)

    @staticmethod
    def _dead() -> Future:
        future = Future()
        future.set_exception(ConnectionError("this peer is dead"))
        return future


def sim_store(node: SimNode, **kwargs):
    """A real `BucketStore` over `node`: only what needs a hivemind process (validators) is skipped."""
    from hivetrain.assign.store import BucketStore

    class SimStore(BucketStore):
        def open(self) -> bytes:
            self._owner = f"[owner:{node.name}]".encode()
            return self._owner

        def _ensure_keys(self, epochs) -> None:
            pass

    return SimStore(node, **kwargs)


class Peer:
    """One simulated peer: a real ShardAssigner, a claimer thread holding up to 4 shards, a reader."""

    def __init__(self, rank: int, read_s: float, dht: SimDHT, args, out: Path):
        from hivetrain.assign import LeaseTiming, ShardAssigner

        self.rank, self.read_s, self.out = rank, read_s, out / f"peer{rank}"
        self.out.mkdir(parents=True)
        self.node = SimNode(dht, f"peer{rank}")
        self.assigner = ShardAssigner(
            shard_names(args.shards), dht=self.node, run_id=RUN_ID, lease_s=args.lease,
            max_epochs=args.epochs, log_dir=self.out, batch=2,
            timing=LeaseTiming(settle_s=args.settle, poll_s=0.5 * args.scale), store=sim_store,
        )  # fmt: skip
        self.stopped = threading.Event()
        self._claims = (self.out / "claims.jsonl").open("a")
        self._lock = threading.Lock()

    def run(self) -> None:
        self.assigner.start()
        slots, ready = threading.Semaphore(4), queue.Queue()  # as bench/assign.py: 4 shards prefetched

        def claimer():
            while not self.stopped.is_set():
                slots.acquire()
                asked = time.time()
                claim = self.assigner.next_claim(timeout=120)
                if claim is not None and not self.stopped.is_set():
                    with self._lock:
                        line = dict(epoch=claim.epoch, shard=claim.shard, asked=asked, got=time.time())
                        self._claims.write(json.dumps(line) + "\n")
                        self._claims.flush()
                ready.put(claim)
                if claim is None:
                    return

        threading.Thread(target=claimer, daemon=True).start()
        while not self.stopped.is_set() and (claim := ready.get()) is not None:
            if self.assigner.taken_elsewhere(claim):
                self.assigner.release(claim)
            elif not self.stopped.wait(self.read_s):
                self.assigner.complete(claim, samples=1)
            slots.release()
        if not self.stopped.is_set():
            self.assigner.close()

    def kill(self) -> None:
        """Die: the DHT hears nothing more from this peer, its reads stop."""
        self.node.dead = True
        self.stopped.set()
        self.assigner.close()  # its last write fails: a crash leaves its records as they were

    def held_unread(self) -> bool:
        with self._lock:
            claims = len((self.out / "claims.jsonl").read_text().splitlines())
        done = self.out / "shards.jsonl"
        return claims > (len(done.read_text().splitlines()) if done.exists() else 0)


def read_times(args) -> list[float]:
    """Per rank: peer 0 3x faster, peer SLOW `--slow` x slower, 2-7 normal, beyond: Pareto speeds."""
    rng = random.Random(args.seed)
    out = []
    for rank in range(args.peers + 1):
        if rank == 0:
            out.append(args.read / 3)
        elif rank == SLOW:
            out.append(args.read * args.slow)
        elif rank < 8 or rank == args.peers:
            out.append(args.read)
        else:  # speed ~ Pareto(2.5) scaled to median 1: read time = read / speed
            speed = rng.paretovariate(2.5) / 2 ** (1 / 2.5)
            out.append(min(args.read / speed, 20 * args.read))
    return out


TIMES = ("read", "lease", "settle", "rtt", "kill_at", "join_at")
"""The arguments in seconds, which `--scale` multiplies."""


def scenario(peers: int, scale: float, args, root: Path) -> dict:
    args = argparse.Namespace(**{**vars(args), "peers": peers, "scale": scale})
    for name in TIMES:
        setattr(args, name, getattr(args, name) * scale)
    out = root / f"sim{peers}"
    hops = max(1, math.ceil(math.log2(max(peers, 2)) / 3))
    dht = SimDHT(hop_s=args.rtt, hops=hops, loss=args.loss, seed=args.seed)
    swarm = [Peer(rank, read, dht, args, out) for rank, read in enumerate(read_times(args))]
    threads = {}
    go = time.time()
    cpu = time.process_time()
    for peer in swarm[:-1]:
        threads[peer.rank] = threading.Thread(target=peer.run, daemon=True)
        threads[peer.rank].start()
    time.sleep(max(0.0, go + args.kill_at - time.time()))
    victim = swarm[VICTIM]
    while not victim.held_unread():
        time.sleep(0.05)
    victim.kill()
    killed = time.time()
    time.sleep(max(0.0, go + args.join_at - time.time()))
    joined = time.time()
    threads[peers] = threading.Thread(target=swarm[-1].run, daemon=True)
    threads[peers].start()
    for rank, thread in threads.items():
        thread.join(timeout=900)
        if thread.is_alive():
            print(f"peer {rank} did not finish", file=sys.stderr)
    result = metrics(out, args, go=go, killed=killed, joined=joined, normal=range(2, min(peers, 8)))
    result["cpu"] = time.process_time() - cpu
    for key in ("reassign", "join", "latency_p50", "latency_p95", "tail", "run_time"):  # back to unscaled s
        if result.get(key) is not None:
            result[key] /= args.scale
    traffic = [peer.assigner._store.traffic for peer in swarm]
    claims = sum(len((p.out / "claims.jsonl").read_text().splitlines()) for p in swarm)
    result["gets"] = sum(t.gets for t in traffic) / claims
    result["gets_per_s"] = sum(t.gets for t in traffic) / len(swarm) / (time.time() - go) * scale
    result["stores"] = sum(t.stores for t in traffic) / claims
    result["kb"] = sum(t.bytes_read + t.bytes_written for t in traffic) / claims / 1000
    largest = max((len(v) for v in dht.table.values()), default=0)
    result["largest"] = largest
    result["hops"] = hops
    return result


def table(results: dict[int, dict], args) -> str:
    def s(v):
        return "never" if v is None else f"{v:.2f}"

    total = args.shards * args.epochs
    rows = [
        ("coverage (target 100%)", lambda r: f"{r['coverage']:.1%}"),
        ("duplicate reads (target < 2%)", lambda r: f"{r['duplicates']} ({r['duplicates'] / total:.1%})"),
        (
            f"dead peer's shards taken over after (s; lease {args.lease:g})",
            lambda r: s(r["reassign"]),
        ),
        ("joiner's first shard after join (s)", lambda r: s(r["join"])),
        ("claim latency p50 / p95 (s)", lambda r: f"{s(r['latency_p50'])} / {s(r['latency_p95'])}"),
        ("3x peer's shards / a normal peer's", lambda r: f"{r['fast_vs_normal']:.2f}"),
        (
            f"epoch end after the others' last own shard (s; peer {SLOW} {args.slow:g}x)",
            lambda r: s(r["tail"]),
        ),
        ("  backup reads", lambda r: str(r["backups"])),
        ("run time (s)", lambda r: s(r["run_time"])),
        ("DHT gets per shard claimed", lambda r: f"{r['gets']:.1f}"),
        ("DHT gets per peer per second", lambda r: f"{r['gets_per_s']:.2f}"),
        ("DHT stores per shard claimed", lambda r: f"{r['stores']:.1f}"),
        ("DHT value KB per shard claimed (read + written)", lambda r: f"{r['kb']:.1f}"),
        ("most records under one key", lambda r: str(r["largest"])),
    ]
    sizes = list(results)
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'peers':<{width}} | " + " | ".join(str(p) for p in sizes) + " |"]
    lines.append(f"|{'-' * (width + 2)}|" + "---|" * len(sizes))
    lines += [f"| {name:<{width}} | " + " | ".join(f(results[p]) for p in sizes) + " |" for name, f in rows]
    base = results[sizes[0]]
    for p in sizes[1:]:
        r = results[p]
        lines.append(
            f"\n{p} peers / {sizes[0]} peers: gets per claim {r['gets'] / base['gets']:.2f}x, "
            f"stores {r['stores'] / base['stores']:.2f}x, bytes {r['kb'] / base['kb']:.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument(
        "--shards", type=int, default=1250, help="an ImageNet epoch: 1,250 shards of 1,000 images"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--read", type=float, default=6.0, help="seconds per shard of a normal peer")
    parser.add_argument("--lease", type=float, default=12.0, help="two reads of a normal peer")
    parser.add_argument("--settle", type=float, default=0.2)
    parser.add_argument("--slow", type=float, default=10.0, help=f"peer {SLOW} reads this many times slower")
    parser.add_argument("--rtt", type=float, default=0.05, help="seconds per DHT lookup hop")
    parser.add_argument("--loss", type=float, default=0.01, help="fraction of DHT stores lost")
    parser.add_argument("--kill-at", type=float, default=4.0)
    parser.add_argument("--join-at", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the peers' logs in this (new) folder")
    parser.add_argument(
        "--scale", type=float, nargs="+", default=[1.0],
        help="per swarm size (or one for all): run every time (reads, lease, settle, hops, kill, join) this "
        "many times slower and report them divided back: a thousand peers' threads on a few cores need "
        "the slack to keep their timing, a few peers finish an epoch sooner at a fraction",
    )  # fmt: skip
    args = parser.parse_args()
    if len(args.scale) not in (1, len(args.peers)):
        parser.error(f"--scale: one factor, or one per swarm size ({len(args.peers)})")
    threading.stack_size(512 << 10)
    import logging

    logging.basicConfig(level=logging.ERROR)
    results = {}
    with tempfile.TemporaryDirectory(prefix="swarm-sim-") as tmp:
        root = args.keep or Path(tmp)
        scales = args.scale * len(args.peers) if len(args.scale) == 1 else args.scale
        for peers, scale in zip(args.peers, scales, strict=True):
            started = time.monotonic()
            results[peers] = scenario(peers, scale, args, root)
            print(f"{peers} peers: {time.monotonic() - started:.0f} s", file=sys.stderr)
            print(table(results, args), file=sys.stderr, flush=True)  # so far, in case a larger swarm fails
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; simulated DHT: "
        f"{args.rtt * 1000:.0f} ms per hop, log2(peers)/3 hops, {args.loss:.0%} of stores lost; "
        f"{args.shards} shards x {args.epochs} epoch(s), read {args.read} s/shard, lease {args.lease} s, "
        f"settle {args.settle} s, peer {VICTIM} dies at {args.kill_at} s, a peer joins at {args.join_at} s"
        + f"; every time x{'/'.join(f'{x:g}' for x in args.scale)} as run, divided back in the table"
    )
    print(table(results, args))


if __name__ == "__main__":
    main()
