"""Shard division among 8 peers with churn: hivetrain's DHT leases vs a fixed per-node split.

    .venv/bin/python bench/assign.py [--peers 8] [--shards 96] [--epochs 2] [--read 1.0] [--lease 5] [--slow 10]

Each peer is its own process. Every peer "reads" a shard by sleeping `--read` seconds (peer 0 is three
times faster, peer 1 `--slow` times slower); after `--kill-at` seconds peer 3 gets SIGKILL (with its DHT), after `--join-at` seconds a
ninth peer starts. The same scenario runs twice, side by side:

* leases: `hivetrain.assign.ShardAssigner` over real hivemind DHTs on 127.0.0.1 (up to 4 shards held,
  as a prefetching data plane would, claimed 2 per DHT round);
* static: WebDataset's `split_by_node` (RANK/WORLD_SIZE) over the same per-epoch shard order, which is
  how WebDataset and MosaicML Streaming divide an epoch: fixed at its start. A joiner gets nothing.

Prints one table: coverage, duplicate reads, how long the dead peer's shards waited for a new reader,
the joiner's wait for its first shard, claim latency, how long each epoch's end waited on the slow peer,
and run time.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RUN_ID = "bench-assign"
VICTIM = 3
SLOW = 1


def shard_names(n: int) -> list[str]:
    return [f"train-{i:06d}.tar" for i in range(n)]


def wait_for(path: Path, timeout: float = 600.0, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(poll)


# ---- one peer (a child process) --------------------------------------------------------------------


def peer(args) -> None:
    """Claim, read (sleep), complete until the epochs are done; log every claim and every shard read.

    Start-up (imports, DHT) happens before the peer reports ready, except for the joiner, whose DHT
    joins when it is told to: that is part of joining.
    """
    out = args.out / f"peer{args.rank}"
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=out / "peer.log", level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("hivetrain").setLevel(logging.DEBUG)
    claims = (out / "claims.jsonl").open("a")

    def log_claim(epoch, shard, asked, got):
        claims.write(json.dumps(dict(epoch=epoch, shard=shard, asked=asked, got=got)) + "\n")
        claims.flush()

    if args.mode == "static":
        (out / "ready").touch()
        wait_for(args.out / "go")
        static_peer(args, out, log_claim)
        return
    import hivetrain.assign  # noqa: F401  (imports take seconds: not part of joining)

    started = None if args.joiner else lease_assigner(args, out)
    (out / "ready").touch()
    wait_for(args.out / ("join" if args.joiner else "go"))
    assigner, dht = started or lease_assigner(args, out)
    try:
        lease_peer(args, assigner, log_claim)
    finally:
        dht.shutdown()


def static_peer(args, out: Path, log_claim) -> None:
    import webdataset as wds

    from hivetrain.leases import shard_order

    if args.joiner:
        return  # a fixed split has no place for a peer that arrives mid-epoch
    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world))
    names = shard_names(args.shards)
    with (out / "shards.jsonl").open("a") as log:
        for epoch in range(args.epochs):
            for index in wds.split_by_node(shard_order(RUN_ID, 0, epoch, args.shards)):
                start = time.time()
                log_claim(epoch, names[index], start, start)
                time.sleep(args.read)
                line = dict(
                    epoch=epoch, shard=names[index], start=start, end=time.time(), samples=1, peer=args.rank
                )
                log.write(json.dumps(line) + "\n")
                log.flush()


def lease_assigner(args, out: Path):
    """Start this peer's DHT and assigner; note how long each took (the joiner's wait is made of them)."""
    from hivetrain.assign import LeaseTiming, ShardAssigner
    from hivetrain.dht import make_dht

    begin = time.time()
    dht = make_dht(run_id=RUN_ID, initial_peers=[args.initial_peer])
    up = time.time()
    assigner = ShardAssigner(
        shard_names(args.shards),
        dht=dht,
        run_id=RUN_ID,
        lease_s=args.lease,
        max_epochs=args.epochs,
        log_dir=out,
        batch=2,
        timing=LeaseTiming(settle_s=args.settle, poll_s=0.5),
    ).start()
    (out / "startup.json").write_text(json.dumps(dict(dht=up - begin, assigner=time.time() - up)))
    return assigner, dht


def lease_peer(args, assigner, log_claim) -> None:
    import queue
    import threading

    slots, ready = threading.Semaphore(4), queue.Queue()  # the data plane prefetches 4 shards

    def claimer():
        while True:
            slots.acquire()
            asked = time.time()
            claim = assigner.next_claim(timeout=120)
            if claim is not None:
                log_claim(claim.epoch, claim.shard, asked, time.time())
            ready.put(claim)
            if claim is None:
                return

    threading.Thread(target=claimer, daemon=True).start()
    while (claim := ready.get()) is not None:
        if assigner.taken_elsewhere(claim):  # as hivetrain.feed does: a backup reader took it over
            assigner.release(claim)
        else:
            time.sleep(args.read)
            assigner.complete(claim, samples=1)
        slots.release()
    assigner.close()


# ---- the scenario ------------------------------------------------------------------------------------


def scenario(mode: str, args, root: Path) -> dict:
    """Run one mode with the churn schedule; return its metrics."""
    out = root / mode
    out.mkdir(parents=True)
    bootstrap = None
    initial = "none"
    if mode == "lease":
        from hivetrain.dht import make_dht, visible_addresses

        bootstrap = make_dht(run_id=RUN_ID)  # only an entry point: it claims nothing
        initial = visible_addresses(bootstrap)[0]
    cpu = os.times()
    procs = []
    for rank in range(args.peers + 1):
        joiner = rank == args.peers
        read = args.read / 3 if rank == 0 else args.read * (args.slow if rank == SLOW else 1)
        cmd = [
            sys.executable,
            __file__,
            "--peer",
            "--mode",
            mode,
            "--rank",
            str(rank),
            "--world",
            str(args.peers),
        ]
        cmd += ["--shards", str(args.shards), "--epochs", str(args.epochs), "--read", str(read)]
        cmd += ["--lease", str(args.lease), "--settle", str(args.settle), "--initial-peer", initial]
        cmd += ["--out", str(out)] + (["--joiner"] if joiner else [])
        procs.append(subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL))
    try:
        for rank in range(args.peers + 1):
            wait_for(out / f"peer{rank}" / "ready")
        print(f"{mode}: {args.peers} peers ready, go", file=sys.stderr)
        go = time.time()
        (out / "go").touch()
        time.sleep(max(0.0, go + args.kill_at - time.time()))
        victim = out / f"peer{VICTIM}"
        while len(_lines(victim / "claims.jsonl")) <= len(_lines(victim / "shards.jsonl")):
            time.sleep(0.05)  # kill it while it holds shards
        os.killpg(procs[VICTIM].pid, signal.SIGKILL)
        killed = time.time()
        time.sleep(max(0.0, go + args.join_at - time.time()))
        joined = time.time()
        (out / "join").touch()
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if bootstrap is not None:
            bootstrap.shutdown()
    used = os.times()
    result = metrics(out, args, go=go, killed=killed, joined=joined)
    result["cpu"] = used.children_user + used.children_system - cpu.children_user - cpu.children_system
    return result


def metrics(out: Path, args, *, go: float, killed: float, joined: float, normal=None) -> dict:
    """The table's numbers from the peers' logs (`normal`: the ranks of normal speed, default all but
    peers 0, VICTIM and SLOW)."""
    reads, claims = {}, {}
    for rank in range(args.peers + 1):
        d = out / f"peer{rank}"
        reads[rank] = [json.loads(x) for x in _lines(d / "shards.jsonl")]
        claims[rank] = [json.loads(x) for x in _lines(d / "claims.jsonl")]
    every = [r for rs in reads.values() for r in rs]
    counts = collections.Counter((r["epoch"], r["shard"]) for r in every)
    total = args.shards * args.epochs
    finished_by_victim = {(r["epoch"], r["shard"]) for r in reads[VICTIM]}
    in_flight = {(c["epoch"], c["shard"]) for c in claims[VICTIM]} - finished_by_victim
    others = [c for rank, cs in claims.items() if rank != VICTIM for c in cs]
    takeover = [
        min((c["got"] for c in others if (c["epoch"], c["shard"]) == k), default=None) for k in in_flight
    ]
    joiner = claims[args.peers]
    latency = sorted(c["got"] - c["asked"] for c in others)
    first_end: dict[tuple[int, str], float] = {}
    for r in every:
        key = (r["epoch"], r["shard"])
        first_end[key] = min(first_end.get(key, r["end"]), r["end"])
    tails = []  # per epoch: its end after the last shard the other peers read of it as their own share
    for epoch in range(args.epochs):
        ends = [t for (e, _), t in first_end.items() if e == epoch]
        theirs = [
            r["end"]
            for rank, rs in reads.items()
            if rank != SLOW
            for r in rs
            if r["epoch"] == epoch and not r.get("backup")
        ]
        if ends and theirs:
            tails.append(max(0.0, max(ends) - max(theirs)))
    return {
        "coverage": len(counts) / total,
        "lost": total - len(counts),
        "duplicates": sum(counts.values()) - len(counts),
        "in_flight": len(in_flight),
        "reassign": None if None in takeover or not takeover else max(takeover) - killed,
        "join": min(c["got"] for c in joiner) - joined if joiner else None,
        "join_dht": _startup(out / f"peer{args.peers}").get("dht"),
        "latency_p50": statistics.median(latency) if latency else 0.0,
        "latency_p95": latency[int(0.95 * (len(latency) - 1))] if latency else 0.0,
        "run_time": max(r["end"] for r in every) - go,
        "fast_vs_normal": len(reads[0])
        / statistics.mean(len(reads[r]) for r in (normal or range(1, args.peers)) if r not in (VICTIM, SLOW)),
        "tail": max(tails, default=0.0),
        "backups": sum(bool(r.get("backup")) for r in every),
    }


def _startup(d: Path) -> dict:
    return json.loads((d / "startup.json").read_text()) if (d / "startup.json").exists() else {}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def table(results: dict, args) -> str:
    def s(v, unit=""):
        return "never" if v is None else f"{v:.2f}{unit}"

    lease, static = results["lease"], results["static"]
    total = args.shards * args.epochs
    rows = [
        ("coverage (target 100%)", f"{lease['coverage']:.1%}", f"{static['coverage']:.1%}"),
        ("shards never read", str(lease["lost"]), str(static["lost"])),
        (
            "duplicate reads (target < 5%)",
            f"{lease['duplicates']} ({lease['duplicates'] / total:.1%})",
            f"{static['duplicates']} ({static['duplicates'] / total:.1%})",
        ),
        ("dead peer's shards in flight", str(lease["in_flight"]), str(static["in_flight"])),
        ("reassigned after kill (s)", s(lease["reassign"]), s(static["reassign"])),
        ("joiner's first shard after join (s)", s(lease["join"]), s(static["join"])),
        ("  of which its DHT start-up (s)", s(lease["join_dht"]), "-"),
        (
            "claim latency p50 / p95 (s)",
            f"{s(lease['latency_p50'])} / {s(lease['latency_p95'])}",
            "0 (fixed list)",
        ),
        (
            "3x peer's shards / a normal peer's",
            f"{lease['fast_vs_normal']:.2f}",
            f"{static['fast_vs_normal']:.2f}",
        ),
        (
            f"epoch end after the others' last own shard, worst (s; peer {SLOW} {args.slow:g}x slower)",
            s(lease["tail"]),
            s(static["tail"]),
        ),
        ("  backup reads (second readers of stragglers)", str(lease["backups"]), "-"),
        ("run time (s)", s(lease["run_time"]), s(static["run_time"])),
        ("CPU time of all peers, start-up included (s)", s(lease["cpu"]), s(static["cpu"])),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'':<{width}} | DHT leases | static split_by_node |", f"|{'-' * (width + 2)}|---|---|"]
    lines += [f"| {a:<{width}} | {b} | {c} |" for a, b, c in rows]
    ratio = lease["run_time"] / static["run_time"]
    lines.append(
        f"\nrun time ratio leases / static: {ratio:.2f} (static read {total - static['lost']} of {total})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--read", type=float, default=1.0, help="seconds per shard (peer 0: a third)")
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=0.2)
    parser.add_argument("--slow", type=float, default=1.0, help=f"peer {SLOW} reads this many times slower")
    parser.add_argument("--kill-at", type=float, default=4.0)
    parser.add_argument("--join-at", type=float, default=6.0)
    parser.add_argument("--keep", type=Path, help="keep the peers' logs in this (new) folder")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["lease", "static"], help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--initial-peer", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--joiner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-assign-") as tmp:
        root = args.keep or Path(tmp)
        results = {mode: scenario(mode, args, root) for mode in ("lease", "static")}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.peers} peers + 1 joiner, {args.shards} shards x {args.epochs} epochs, read {args.read} s/shard "
        f"(peer 0: {args.read / 3:.2f} s), lease {args.lease} s, settle {args.settle} s, "
        f"kill peer {VICTIM} at {args.kill_at} s, join at {args.join_at} s, load avg {os.getloadavg()[0]:.1f}"
    )
    print(table(results, args))


if __name__ == "__main__":
    main()
