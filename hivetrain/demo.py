"""`make demo`: the whole system on one machine, offline, in a few minutes on a CPU.

1. `shardtool synth` generates a small learnable dataset (Tiny-ImageNet layout, 10 classes).
2. `shardtool build` turns it into shards + manifest, `shardtool verify` checks them.
3. `shardtool serve` serves them over HTTP on 127.0.0.1.
4. Two `hivetrain run` peers join one run, fetch shards from the server on demand, divide every epoch's
   shards through the DHT, and average gradients with hivemind.
5. `hivetrain monitor` shows the run live at http://127.0.0.1:8080/.
6. Each peer reports its validation accuracy; chance is 10%.

Every step is the real command a user would type; its output is shown prefixed by who printed it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
DEMO_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
"""Output as it comes; one compute thread per process, as the peers share this machine's cores (two
peers of a thread per core each would contend and train several times slower)."""


def _relay(proc: subprocess.Popen, prefix: str, sink: list[str]) -> threading.Thread:
    def pump() -> None:
        for line in proc.stdout:
            sink.append(line)
            sys.stdout.write(f"{prefix} {line}")
            sys.stdout.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _step(title: str, *args: str) -> None:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    subprocess.run([str(BIN / args[0]), *args[1:]], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="demo", help="working folder (recreated)")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the training shards")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--monitor-port", type=int, default=8080, help="the monitor's page (0: any free port)"
    )
    args = parser.parse_args(argv)

    work = Path(args.dir)
    if work.exists():
        shutil.rmtree(work)
    data, shards = work / "data", work / "shards"
    started = time.monotonic()
    _step("1. generate a learnable dataset", "shardtool", "synth", str(data), "--classes", str(args.classes),
          "--train-per-class", "300", "--val-per-class", "50", "--size", "32")  # fmt: skip
    _step("2. build shards and verify them", "shardtool", "build", str(data), "--out", str(shards),
          "--max-per-shard", "100", "--workers", "2")  # fmt: skip
    _step("2b.", "shardtool", "verify", str(shards / "manifest.json"))

    procs: list[subprocess.Popen] = []

    def start(prefix: str, sink: list[str], *cmd: str) -> subprocess.Popen:
        print(f"$ {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, env={**os.environ, **DEMO_ENV})  # fmt: skip
        procs.append(proc)
        _relay(proc, prefix, sink)
        return proc

    try:
        print("\n=== 3. serve the shards over HTTP", flush=True)
        server_out: list[str] = []
        start("[serve] ", server_out, "shardtool", "-q", "serve", str(shards), "--port", "0")
        url = _wait_for(
            lambda: _first_match(server_out, r"(http://127\.0\.0\.1:\d+/)"), "the server's address"
        )
        manifest = url + "manifest.json"

        print("\n=== 4. two training peers join one run and divide the shards through the DHT", flush=True)
        common = ["--shards", manifest, "--run-id", "demo", "--image-size", "32", "--batch", "32",
                  "--target-global-bsz", "256", "--epochs", str(args.epochs), "--workers", "1",
                  "--matchmaking-time", "2", "--averaging-timeout", "20", "--lease", "10"]  # fmt: skip
        out1: list[str] = []
        peer1 = start("[peer-1]", out1, "hivetrain", "run", *common, "--name", "peer-1",
                      "--log-dir", str(work / "peer-1"), "--checkpoint-dir", str(work / "peer-1" / "checkpoints"))  # fmt: skip
        maddrs = work / "peer-1" / "maddrs.txt"
        first = _wait_for(lambda: maddrs.exists() and maddrs.read_text().split(), "peer-1's address")[0]
        out2: list[str] = []
        peer2 = start("[peer-2]", out2, "hivetrain", "run", *common, "--initial-peer", first, "--name", "peer-2",
                      "--log-dir", str(work / "peer-2"))  # fmt: skip

        print("\n=== 5. watch the run: open the monitor's page in a browser", flush=True)
        monitor_out: list[str] = []
        start("[monitor]", monitor_out, "hivetrain", "monitor", "--run-id", "demo", "--initial-peer", first,
              "--port", str(args.monitor_port), "--shards", manifest)  # fmt: skip
        codes = [peer1.wait(), peer2.wait()]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    print(f"\n=== 6. results ({time.monotonic() - started:.0f} s)", flush=True)
    chance = 100 / args.classes
    best = 0.0
    for name, out, code in (("peer-1", out1, codes[0]), ("peer-2", out2, codes[1])):
        top1 = _first_match(out, r"val top-1 ([\d.]+)%", last=True)
        print(f"{name}: exit {code}, validation top-1 {top1 or '?'}% (chance {chance:.0f}%)")
        best = max(best, float(top1 or 0))
    print(
        f"logs: {work}/peer-*/metrics.jsonl and shards.jsonl; checkpoint: {work}/peer-1/checkpoints/best.pt"
    )
    ok = all(c == 0 for c in codes) and best > 3 * chance
    print("demo " + ("succeeded: accuracy far above chance" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


def _first_match(lines: list[str], pattern: str, *, last: bool = False) -> str | None:
    found = [m.group(1) for line in lines if (m := re.search(pattern, line))]
    return (found[-1] if last else found[0]) if found else None


def _wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.2)
    return result


if __name__ == "__main__":
    sys.exit(main())
