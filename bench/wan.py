"""Synchronisation modes side by side: bytes per sample, compute utilisation over emulated internet links,
utilisation on loopback, and accuracy at equal samples.

Every row is real `hivetrain run` peers training a ResNet-18 (small-image stem) at 16 px on `shardtool
synth` data (10 classes; `--hard`: 48), shards read in place beside a local manifest (no data traffic),
the peers of a row started together (the run's DHT first, from a `hivetrain monitor`), the rows of a part
one after another in this one invocation. Ratios compare a row with today's default (`--sync
every-step`, matchmaking 15 s, averaging timeout 60 s, fp16) in the same part.

  bytes      4 peers, each in its own network namespace behind an emulated link (tests/wanlab.py, needs
             root) of 1 Gbit/s and 25 ms (50 ms between peers), where every mode's rounds succeed:
             bytes each peer sent and received per sample it trained, from its link's interface counters
             (and, beside them, what the peer's own p2p meter counted), and a labelled projection for
             ResNet-50 at 256 images per local step.
  link       the same 4 peers behind links scaled to this machine: one fp16 copy of the model takes as
             long to send, relative to one local step (measured first, the 4 peers training at once
             without averaging), as ResNet-50 in fp16 (51 MB) over 100 Mbit/s takes relative to an H100
             step of 256 images (~48 local steps); 50 ms between peers. Compute utilisation (seconds in
             forward, backward and optimizer steps over the window's wall time), sync waits, samples/s.
  loopback   2 peers on 127.0.0.1, no shaping, today's default against the default flags.
  accuracy   2 peers on loopback, the same data and number of samples for every mode, `--seeds` seeds.

    .venv/bin/python bench/wan.py [--parts bytes,link,loopback,accuracy] [--window 300] [--hard]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BIN = Path(sys.executable).parent
RESNET50_FP16_BYTES = 25_557_032 * 2  # torchvision resnet50, 1000 classes, 2 bytes a parameter
H100_BATCH = 256
IMAGENET_TARGET = 1024  # the ImageNet recipe's global batch (hivetrain.recipe)
TODAY = (
    "--sync",
    "every-step",
    "--matchmaking-time",
    "15",
    "--averaging-timeout",
    "60",
    "--compression",
    "fp16",
)


@dataclass(frozen=True)
class Setup:
    """What every row trains: the data, the resolution, the local batch."""

    manifest: Path
    size: int
    batch: int

    def args(self, run_id: str, *, epochs: int = 1000, seed: int = 0) -> list[str]:
        return ["--shards", str(self.manifest), "--run-id", run_id, "--image-size", str(self.size),
                "--model", "resnet18", "--batch", str(self.batch), "--target-global-bsz", str(4 * self.batch),
                "--workers", "0", "--epochs", str(epochs), "--lease", "20", "--seed", str(seed),
                "--val-interval", "1000000000"]  # fmt: skip

    def model_fp16_bytes(self) -> int:
        """fp16 bytes of the model the peers train (the recipe's ResNet-18 with its small-image stem)."""
        from hivetrain import recipe as recipes
        from shardtool import manifest as manifest_io

        m = manifest_io.load(self.manifest)
        recipe = recipes.training_recipe(m, model="resnet18", image_size=self.size)
        return 2 * sum(p.numel() for p in recipes.build_model(recipe, m.num_classes).parameters())


@dataclass(frozen=True)
class Mode:
    name: str
    flags: tuple[str, ...]
    local_steps_per_sync: int  # local steps each peer trains between averaging rounds (for the projection)


def modes(local_steps: int) -> list[Mode]:
    return [
        Mode("every-step (today's default)", TODAY, 1),  # target = 4 local batches: one per peer of 4
        Mode(
            f"diloco H={local_steps}, fp16",
            ("--sync", "diloco", "--local-steps", str(local_steps), "--compression", "fp16"),
            local_steps,
        ),
        Mode(
            f"diloco H={local_steps}, 8-bit",
            ("--sync", "diloco", "--local-steps", str(local_steps), "--compression", "8bit"),
            local_steps,
        ),
    ]


def dataset(root: Path, *, hard: bool, per_class: int, size: int) -> Path:
    classes = 48 if hard else 10
    out = root / f"data-{classes}x{per_class}-{size}px"
    manifest = out / "shards" / "manifest.json"
    if not manifest.exists():
        subprocess.run([BIN / "shardtool", "-q", "synth", out / "src", "--classes", str(classes),
                        "--train-per-class", str(per_class), "--val-per-class", "20", "--size", str(size)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        subprocess.run([BIN / "shardtool", "-q", "build", out / "src", "--out", out / "shards",
                        "--max-per-shard", "100", "--workers", "2"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return manifest


# ---- running peers ---------------------------------------------------------------------------------


@dataclass
class Swarm:
    """The peers of one run, each logging into its own folder."""

    logs: list[Path]
    procs: list[subprocess.Popen] = field(default_factory=list)  # the run's DHT (a monitor) first
    training_since: float = 0.0  # when the last peer began to train

    def lines(self, i: int) -> list[dict]:
        """Peer i's metrics.jsonl."""
        path = self.logs[i] / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def steps(self, i: int) -> list[dict]:
        return [m for m in self.lines(i) if "step" in m]

    def stop(self, timeout: float = 120.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


VERBOSE: list[str] = []
PEER_ENV = dict(os.environ, OMP_NUM_THREADS="1")
"""Each peer computes on one thread: several peers on a few cores would otherwise each start a thread
per core and spend most of their time contending (measured here: ResNet-18 steps 5x slower with four
peers of two threads each on two cores than of one thread each)."""


def local(_i, cmd, out) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=PEER_ENV)


def in_lab(lab):
    """Launch peer i (or, for None, the run's DHT in the hub) in its namespace of the lab."""
    from tests.wanlab import HUB

    return lambda i, cmd, out: lab.popen(
        HUB if i is None else i, cmd, stdout=out, stderr=subprocess.STDOUT, env=PEER_ENV
    )


def lab_host(lab):
    from tests.wanlab import HUB

    return lambda i: lab.address(HUB if i is None else i)


def start_swarm(launch, peers: int, work: Path, args: list[str], host_of) -> Swarm:
    """Start the run's DHT (a `hivetrain monitor`), then every peer in quick succession, each given the
    addresses of the monitor and of all peers before it; returns once all train.

    Every peer dials every other one itself: inside the emulated network (198.18.0.0/15, a range that
    libp2p treats as unroutable) peers that knew each other only through a third node could not open
    streams to each other ("routing: not found"), so their averaging rounds never formed. Starting
    within seconds of each other, no peer is far ahead (the others would download its state first).
    """
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    swarm = Swarm([work / f"peer{i}" for i in range(peers)])
    run_id = args[args.index("--run-id") + 1]
    monitor_out = work / "monitor.txt"
    with monitor_out.open("w") as out:
        swarm.procs.append(launch(None, [str(BIN / "hivetrain"), "monitor", "--run-id", run_id, "--port", "0",
                                         "--host-maddr", f"/ip4/{host_of(None)}/tcp/0"], out))  # fmt: skip
    wait_for(lambda: "--initial-peer" in monitor_out.read_text(), 120, "the run's DHT", swarm)
    known = ["--initial-peer", monitor_out.read_text().split("--initial-peer", 1)[1].split()[0]]
    for i, log in enumerate(swarm.logs):
        log.mkdir(parents=True)
        extra = ["--host-maddr", f"/ip4/{host_of(i)}/tcp/0", "--log-dir", str(log), "--name", f"peer{i}"]
        with (log / "stdout.txt").open("w") as out:
            swarm.procs.append(
                launch(i, [str(BIN / "hivetrain"), *VERBOSE, "run", *args, *extra, *known], out)
            )
        maddrs = log / "maddrs.txt"
        known += [
            "--initial-peer",
            wait_for(
                lambda m=maddrs: m.exists() and m.read_text().split(), 180, f"peer {i}'s address", swarm
            )[0],
        ]
    wait_for(lambda: all(swarm.steps(i) for i in range(peers)), 900, "every peer to train", swarm)
    swarm.training_since = time.time()
    return swarm


def wait_for(predicate, timeout: float, what: str, swarm: Swarm | None = None):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if swarm and any(p.poll() not in (None, 0) for p in swarm.procs):
            bad = next(i for i, p in enumerate(swarm.procs) if p.poll() not in (None, 0))
            log = swarm.logs[bad - 1] / "stdout.txt" if bad else swarm.logs[0].parent / "monitor.txt"
            raise SystemExit(f"{log} ends with:\n" + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)
    return result


@dataclass(frozen=True)
class Window:
    """One peer over a measurement window: samples trained, seconds computing and waiting on averaging,
    the bytes its link carried (interface counters) and its p2p meter counted."""

    samples: int
    span: float
    compute: float
    wait: float
    link_sent: int
    link_received: int
    p2p_sent: int | None


def measure(swarm: Swarm, counters, *, warmup: float, window: float, batch: int) -> list[Window]:
    """Run `window` seconds after `warmup`; `counters(i)` reads peer i's link (None: no lab)."""
    peers = len(swarm.logs)
    time.sleep(warmup)
    t0, c0 = time.time(), [counters(i) for i in range(peers)]
    time.sleep(window)
    t1, c1 = time.time(), [counters(i) for i in range(peers)]
    swarm.stop()
    out = []
    for i in range(peers):
        lines = [m for m in swarm.steps(i) if t0 <= m["time"] <= t1]
        a, b = (lines[0], lines[-1]) if len(lines) >= 2 else ({}, {})
        link = (
            (c1[i].sent_bytes - c0[i].sent_bytes, c1[i].received_bytes - c0[i].received_bytes)
            if c0[i]
            else (0, 0)
        )
        out.append(Window(
            samples=batch * max(0, len(lines) - 1), span=b.get("time", t1) - a.get("time", t0),
            compute=b.get("compute_s", 0.0) - a.get("compute_s", 0.0), wait=b.get("sync_wait_s", 0.0) - a.get("sync_wait_s", 0.0),
            link_sent=link[0], link_received=link[1],
            p2p_sent=b["sent_bytes"] - a["sent_bytes"] if b.get("sent_bytes") is not None else None,
        ))  # fmt: skip
    return out


def summary(windows: list[Window]) -> dict:
    samples = sum(w.samples for w in windows)
    p2p = [w.p2p_sent for w in windows]
    return dict(
        rate=samples / max(1e-9, statistics.fmean(w.span for w in windows)),
        util=statistics.fmean(w.compute / w.span for w in windows if w.span > 0),
        wait=statistics.fmean(w.wait / w.span for w in windows if w.span > 0),
        sent=sum(w.link_sent for w in windows) / max(1, samples),
        received=sum(w.link_received for w in windows) / max(1, samples),
        p2p=sum(p2p) / max(1, samples) if None not in p2p else float("nan"),
        samples=samples,
    )


# ---- the parts ---------------------------------------------------------------------------------------


def lab_missing(part: str) -> bool:
    """True (and says why) when the emulated links cannot be built here (not root, no namespaces)."""
    from tests.wanlab import unavailable_reason

    if reason := unavailable_reason():
        print(f"{part} part skipped: {reason}")
    return bool(reason)


def run_modes(lab, setup: Setup, args, work: Path, label: str) -> list[tuple[Mode, dict]]:
    rows = []
    for mode in modes(args.local_steps):
        print(f"-- {label}: {mode.name}", flush=True)
        swarm = start_swarm(in_lab(lab), 4, work / f"{len(rows)}-{mode.name.split()[0]}",
                            [*setup.args(f"{label}-{time.time_ns()}"), *mode.flags], lab_host(lab))  # fmt: skip
        windows = measure(swarm, lab.counters, warmup=args.warmup, window=args.window, batch=setup.batch)
        rows.append((mode, summary(windows)))
    return rows


def part_bytes(args, setup: Setup, root: Path) -> None:
    from tests.wanlab import WanLab

    if lab_missing("bytes"):
        return
    with WanLab(peers=4, rate_mbit=1000, rtt_ms=25) as lab:
        rows = run_modes(lab, setup, args, root / "bytes", "bytes")
    model = setup.model_fp16_bytes()
    print(f"\n4 peers behind 1 Gbit/s links, 50 ms between peers; ResNet-18 ({model / 1e6:.1f} MB in fp16) at "
          f"{setup.size} px, batch {setup.batch}, global batch {4 * setup.batch}; {args.window:.0f} s per row")  # fmt: skip
    print("| mode | samples trained | sent B/sample (link) | (p2p meter) | received B/sample | fewer bytes than "
          "today | ResNet-50 at 256/step: B/sample (projected) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = rows[0][1]["sent"]
    for mode, s in rows:
        # bytes per round scale with the model; samples per round with the local batch (same H)
        projected = s["sent"] * (RESNET50_FP16_BYTES / model) * (setup.batch / H100_BATCH)
        if mode.local_steps_per_sync == 1:  # every-step: a round per ImageNet global batch of 1024 over 4
            projected = s["sent"] * (RESNET50_FP16_BYTES / model) * (setup.batch / (IMAGENET_TARGET / 4))
        print(f"| {mode.name} | {s['samples']} | {s['sent']:,.0f} | {s['p2p']:,.0f} | {s['received']:,.0f} "
              f"| {base / s['sent']:.0f}x | {projected:,.0f} |")  # fmt: skip
    print("(projected = measured B/sample x ResNet-50 / this model's fp16 bytes x this local batch / ImageNet's "
          "samples per peer between rounds: a projection, not a measurement)")  # fmt: skip


def part_link(args, setup: Setup, root: Path) -> None:
    from tests.wanlab import WanLab

    if lab_missing("link"):
        return
    with WanLab(peers=4, rate_mbit=1000, rtt_ms=0) as lab:  # calibration: the same namespaces, no limit
        swarm = start_swarm(in_lab(lab), 4, root / "calibrate",
                            [*setup.args("calibrate"), "--sync", "diloco", "--local-steps", "1000000"], lab_host(lab))  # fmt: skip
        time.sleep(args.calibrate)
        swarm.stop()
    steps = [m["time"] for i in range(4) for m in swarm.steps(i)]
    gaps = [
        b["time"] - a["time"]
        for i in range(4)
        for a, b in zip(swarm.steps(i), swarm.steps(i)[1:])
        if a["time"] >= swarm.training_since
    ]
    step_s = statistics.median(gaps) if gaps else (max(steps) - min(steps)) / max(1, len(steps))
    model = setup.model_fp16_bytes()
    rate_mbit = model * 8 / (48 * step_s) / 1e6
    print(f"local step with 4 peers training at once: {step_s:.3f} s (median of {len(gaps)}); one fp16 model "
          f"copy ({model / 1e6:.1f} MB) in 48 steps: {rate_mbit:.2f} Mbit/s per peer each way; 50 ms between peers")  # fmt: skip
    with WanLab(peers=4, rate_mbit=rate_mbit, rtt_ms=25) as lab:
        lab.check(file=sys.stdout)
        rows = run_modes(lab, setup, args, root / "link", "link")
    print(f"\n4 peers behind {rate_mbit:.2f} Mbit/s links (one model copy = 48 local steps of {step_s:.2f} s), "
          f"50 ms between peers; {args.window:.0f} s per row")  # fmt: skip
    print("| mode | samples/s (swarm) | compute utilisation | sync wait | sent B/sample (link) | utilisation "
          "vs today |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[0][1]["util"]
    for mode, s in rows:
        print(f"| {mode.name} | {s['rate']:.1f} | {s['util']:.1%} | {s['wait']:.1%} | {s['sent']:,.0f} "
              f"| {s['util'] / base:.0f}x |")  # fmt: skip


def part_loopback(args, setup: Setup, root: Path) -> None:
    rows = []
    for name, flags in (("every-step (today's default)", TODAY), ("default flags", ())):
        print(f"-- loopback: {name}", flush=True)
        swarm = start_swarm(local, 2, root / "loopback" / str(len(rows)),
                            [*setup.args(f"loop-{time.time_ns()}"), *flags], lambda i: "127.0.0.1")  # fmt: skip
        rows.append((name, summary(measure(swarm, lambda i: None, warmup=args.warmup, window=args.window,
                                           batch=setup.batch))))  # fmt: skip
    print(f"\n2 peers on 127.0.0.1, no shaping; {args.window:.0f} s per row")
    print("| flags | samples/s (swarm) | compute utilisation | sync wait | utilisation vs today |")
    print("|---|---:|---:|---:|---:|")
    for name, s in rows:
        print(
            f"| {name} | {s['rate']:.1f} | {s['util']:.1%} | {s['wait']:.1%} | {s['util'] / rows[0][1]['util']:.1f}x |"
        )


ACCURACY_CANDIDATES = {
    "every-step": ("every-step", ("--sync", "every-step", "--matchmaking-time", "2")),
    "fp16": ("diloco (default H), fp16", ("--sync", "diloco", "--compression", "fp16")),
    "8bit": ("diloco (default H), 8-bit", ("--sync", "diloco", "--compression", "8bit")),
    "nesterov": (
        "diloco, outer Nesterov 0.7/0.9",
        ("--sync", "diloco", "--outer-lr", "0.7", "--outer-momentum", "0.9"),
    ),
}
"""The accuracy part's modes (`--candidates`); every-step, the baseline, first."""


def part_accuracy(args, setup: Setup, root: Path) -> None:
    results: dict[str, list[float]] = {}
    for index, key in enumerate(args.candidates.split(",")):
        name, flags = ACCURACY_CANDIDATES[key]
        for seed in range(args.seeds):
            print(f"-- accuracy: {name}, seed {seed}", flush=True)
            run = setup.args(f"acc-{time.time_ns()}", epochs=args.epochs, seed=seed)
            swarm = start_swarm(local, 2, root / "accuracy" / f"{index}-{key}-{seed}", [*run, *flags],
                                lambda i: "127.0.0.1")  # fmt: skip
            for p in swarm.procs[1:]:
                p.wait()
            swarm.stop()
            tops = [
                m["val_top1"] for i in range(2) for m in swarm.lines(i)[-1:] if m.get("val_top1") is not None
            ]
            results.setdefault(name, []).append(100 * statistics.fmean(tops) if tops else float("nan"))
    base = statistics.fmean(results["every-step"])
    print(f"\n2 peers, {args.epochs} epochs of {setup.manifest.parent.parent.name}, equal samples; val top-1 (%, "
          "mean of the two peers)")  # fmt: skip
    print("| mode | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean | vs every-step |")
    print("|---|" + "---:|" * (args.seeds + 2))
    for name, tops in results.items():
        mean = statistics.fmean(tops)
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in tops) + f" | {mean:.1f} | {mean - base:+.1f} |")


PARTS = {"bytes": part_bytes, "link": part_link, "loopback": part_loopback, "accuracy": part_accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from: " + ", ".join(PARTS))
    parser.add_argument("--window", type=float, default=300.0, help="seconds measured per row")
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="seconds after every peer trains, unmeasured"
    )
    parser.add_argument("--calibrate", type=float, default=60.0, help="seconds of the step-time calibration")
    parser.add_argument("--local-steps", type=int, default=64, help="H of the diloco rows (bytes, link)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--candidates", default=",".join(ACCURACY_CANDIDATES),
        help="accuracy: modes to compare, from: " + ", ".join(ACCURACY_CANDIDATES) + " (every-step first)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=6, help="accuracy: passes over the data")
    parser.add_argument("--per-class", type=int, default=300, help="training images per class")
    parser.add_argument("--size", type=int, default=16, help="image side (px)")
    parser.add_argument("--batch", type=int, default=16, help="samples per local step")
    parser.add_argument("--hard", action="store_true", help="48 classes instead of 10")
    parser.add_argument("--keep", type=Path, help="keep the peers' logs in this folder")
    args = parser.parse_args()
    candidates = args.candidates.split(",")
    unknown = sorted(set(candidates) - set(ACCURACY_CANDIDATES))
    if unknown or candidates[0] != "every-step":
        parser.error(
            f"--candidates: unknown {unknown}" if unknown else "--candidates: every-step comes first"
        )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"command: {' '.join(sys.argv)}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
        root = args.keep or Path(tmp)
        setup = Setup(
            dataset(root, hard=args.hard, per_class=args.per_class, size=args.size), args.size, args.batch
        )
        for part in args.parts.split(","):
            PARTS[part](args, setup, root)


if __name__ == "__main__":
    main()
