"""Fetch throughput on loopback: `shardtool fetch` against curl (HTTP) and aria2c (BitTorrent).

Side by side, same files, same server, same machine, alternating order, median of --repeat runs:

- HTTP: `shardtool fetch --via http` (sha256-verified while streaming, fsynced, renamed into place) from
  `shardtool serve`, against `curl` fetching the same URLs from the same server (one connection reused
  for --jobs 1, `curl --parallel` for more), and `curl` followed by `sha256sum` for reference;
- BitTorrent: one `shardtool seed` seeder, announced through opentracker, to 1 and to 3 simultaneous
  fetchers: `shardtool fetch --via torrent` against `aria2c` (aggregate MB/s for 3).

Usage: .venv/bin/python bench/fetch.py [--shards 8] [--shard-mb 64] [--jobs 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shardtool.manifest import load  # noqa: E402
from shardtool.transport.torrent import write_torrents  # noqa: E402
from tests.shardset import make_shard_set  # noqa: E402

BIN = Path(sys.executable).parent
ARIA2 = [
    "--interface=127.0.0.1", "--disable-ipv6=true", "--enable-dht=false", "--enable-dht6=false",
    "--bt-enable-lpd=false", "--enable-peer-exchange=false", "--summary-interval=0",
    "--console-log-level=error", "--download-result=hide", "--seed-time=0", "--bt-stop-timeout=120",
    "--file-allocation=none",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def seeders(tracker_port: int, infohash: str) -> int:
    """How many seeders opentracker knows for `infohash` (its scrape answer)."""
    import urllib.parse
    import urllib.request

    import libtorrent as lt

    query = urllib.parse.quote_from_bytes(bytes.fromhex(infohash))
    with urllib.request.urlopen(f"http://127.0.0.1:{tracker_port}/scrape?info_hash={query}", timeout=5) as r:
        files = lt.bdecode(r.read()).get(b"files", {})
    return next(iter(files.values()), {}).get(b"complete", 0)


def timed(command: Callable[[], None], prepare: Callable[[], None]) -> float:
    prepare()
    start = time.perf_counter()
    command()
    return time.perf_counter() - start


def run(*args, **kw) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL, **kw)


def fresh(*dirs: Path) -> Callable[[], None]:
    def prepare() -> None:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)

    return prepare


def parallel(commands: list[list]) -> Callable[[], None]:
    def go() -> None:
        procs = [subprocess.Popen([str(a) for a in c], stdout=subprocess.DEVNULL) for c in commands]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"exit codes {codes} from {commands[0][0]}")

    return go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-mb", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="Scratch folder [a temporary one].")
    args = ap.parse_args()
    for tool in ("curl", "aria2c", "opentracker", "sha256sum"):
        if not shutil.which(tool):
            sys.exit(f"bench/fetch.py needs {tool} (apt-get install curl aria2 opentracker)")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="shardtool-bench-fetch-"))
    src = work / "src"
    per_shard = 64
    if not (src / "manifest.json").exists():
        print(f"making {args.shards} shards of ~{args.shard_mb} MB in {src} ...", file=sys.stderr)
        make_shard_set(
            src, {"train": (args.shards, per_shard)}, payload=args.shard_mb * 1_000_000 // per_shard
        )
    manifest = load(src)
    shards = manifest.split("train").shards
    total = sum(s.size for s in shards)
    children: list[subprocess.Popen] = []
    results: list[tuple[str, float, str, float]] = []

    def median(cmd, prep) -> float:
        return statistics.median(timed(cmd, prep) for _ in range(args.repeat))

    def compare(label: str, ours, base_label: str, base, nbytes: int) -> None:
        t_ours, t_base = [], []
        for i in range(args.repeat):  # alternate who goes first
            pairs = [(ours, t_ours), (base, t_base)]
            for (cmd, prep), sink in pairs if i % 2 == 0 else reversed(pairs):
                sink.append(timed(cmd, prep))
        mb_ours = nbytes / statistics.median(t_ours) / 1e6
        mb_base = nbytes / statistics.median(t_base) / 1e6
        results.append((label, mb_ours, base_label, mb_base))
        print(f"  {label}: {mb_ours:.0f} MB/s vs {base_label}: {mb_base:.0f} MB/s", file=sys.stderr)

    try:
        # ---- HTTP ---------------------------------------------------------------------------------
        port = free_port()
        children.append(subprocess.Popen(
            [BIN / "shardtool", "-q", "serve", src, "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        wait_port(port)
        base = f"http://127.0.0.1:{port}/"
        urls = [base + s.name for s in shards]
        out_ours, out_curl = work / "http-ours", work / "http-curl"
        for jobs in sorted({1, args.jobs}):
            ours = (
                lambda jobs=jobs: run(BIN / "shardtool", "-q", "fetch", base + "manifest.json", "--out", out_ours,
                                      "--via", "http", "--jobs", jobs, "--no-progress"),
                fresh(out_ours),
            )  # fmt: skip
            curl_args = ["curl", "-sSf"] + (["--parallel", "--parallel-max", str(jobs)] if jobs > 1 else [])
            for url, s in zip(urls, shards):
                curl_args += ["-o", str(out_curl / s.name), url]
            curl = (lambda curl_args=curl_args: run(*curl_args), fresh(out_curl))
            compare(
                f"shardtool fetch --via http -j {jobs}",
                ours,
                f"curl{' --parallel' if jobs > 1 else ''}",
                curl,
                total,
            )
            if jobs == args.jobs:
                hashed = (
                    lambda curl_args=curl_args: (
                        run(*curl_args),
                        run("sha256sum", *[out_curl / s.name for s in shards]),
                    ),
                    fresh(out_curl),
                )
                t = median(*hashed)
                results.append(
                    (
                        "",
                        float("nan"),
                        f"curl{' --parallel' if jobs > 1 else ''} + sha256sum",
                        total / t / 1e6,
                    )
                )

        # ---- BitTorrent ---------------------------------------------------------------------------
        tracker_port = free_port()
        announce = f"http://127.0.0.1:{tracker_port}/announce"
        (info,) = write_torrents(src / "manifest.json", trackers=[announce]).values()
        tracker_dir = work / "tracker"
        tracker_dir.mkdir(mode=0o755, exist_ok=True)
        (tracker_dir / "whitelist").write_text(info.infohash + "\n")
        (tracker_dir / "whitelist").chmod(0o644)
        children.append(subprocess.Popen(
            ["opentracker", "-i", "127.0.0.1", "-p", str(tracker_port), "-P", str(tracker_port),
             "-w", "whitelist", "-d", "."], cwd=tracker_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        wait_port(tracker_port)
        seeder = subprocess.Popen(
            [BIN / "shardtool", "-q", "seed", src / "manifest.json", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        children.append(seeder)
        while not (line := seeder.stdout.readline()).startswith("listening on"):
            if not line:
                raise RuntimeError("shardtool seed exited")
        deadline = time.monotonic() + 60
        while seeders(tracker_port, info.infohash) < 1:  # fetchers must find the seeder on first announce
            if time.monotonic() > deadline:
                raise RuntimeError("the seeder never announced itself to opentracker")
            time.sleep(0.2)
        torrent_file = src / info.file
        for n in (1, 3):
            outs_ours = [work / f"bt-ours-{i}" for i in range(n)]
            outs_aria = [work / f"bt-aria-{i}" for i in range(n)]
            ours = parallel([
                [BIN / "shardtool", "-q", "fetch", src / "manifest.json", "--out", o, "--via", "torrent",
                 "--no-progress", "--listen", "127.0.0.1:0"] for o in outs_ours
            ])  # fmt: skip
            aria = parallel([["aria2c", f"--dir={o}", *ARIA2, torrent_file] for o in outs_aria])
            compare(
                f"shardtool fetch --via torrent, 1 seeder -> {n}", (ours, fresh(*outs_ours)),
                f"aria2c x{n}", (aria, fresh(*outs_aria)), total * n,
            )  # fmt: skip
    finally:
        for proc in children:
            proc.terminate()
        for proc in children:
            proc.wait(timeout=30)

    load_avg = os.getloadavg()
    print(f"\nfetch benchmark: {args.shards} shards x ~{args.shard_mb} MB = {total / 1e6:.0f} MB on loopback, "
          f"median of {args.repeat}; {platform.node()}, {os.cpu_count()} CPUs, load {load_avg[0]:.1f}")  # fmt: skip
    print(f"| {'ours':45} | {'MB/s':>6} | {'baseline':28} | {'MB/s':>6} | {'ratio':>5} |")
    print(f"|{'-' * 47}|{'-' * 8}|{'-' * 30}|{'-' * 8}|{'-' * 7}|")
    for label, mb_ours, base_label, mb_base in results:
        ours_s = f"{mb_ours:6.0f}" if mb_ours == mb_ours else " " * 6
        ratio = f"{mb_ours / mb_base:5.2f}" if mb_ours == mb_ours else " " * 5
        print(f"| {label:45} | {ours_s} | {base_label:28} | {mb_base:6.0f} | {ratio} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
