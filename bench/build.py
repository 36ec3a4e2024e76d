"""Benchmark: `shardtool build` against `tar cf` (the I/O floor) and a plain webdataset ShardWriter loop.

    .venv/bin/python bench/build.py [--images 20000] [--repeat 5] [--workers 1 2]

The source is a generated ILSVRC-layout tree (train/<wnid>/<wnid>_N.JPEG) of photo-like 500x375 JPEGs at
quality 90 (~100 KB: gradients, waves and noise), made once and cached under /tmp. Every contender reads
the same tree, warm in the page cache, and makes its output durable (tar: `sync FILE`; the loop: fsync per
shard; shardtool: fsync per shard, as it always does), so the comparison is of work, not of cache luck.
Contenders run round-robin `--repeat` times. On a shared machine wall times swing with other load, so the
table ranks by the best run (least disturbed) and also shows the median and the CPU seconds each used
(user + system, worker processes included), which other load does not inflate. Python contenders are
timed inside their process: interpreter start and imports are excluded and shown below the table.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLASSES = 100

CPU = (
    "sum(resource.getrusage(w)[i] for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for i in (0, 1))"
)

LOOP = """
import os, resource, sys, time
from pathlib import Path
import webdataset as wds
src, out = Path(sys.argv[1]), Path(sys.argv[2])
t, cpu = time.perf_counter(), CPU
files = sorted(src.rglob("*.JPEG"))
classes = sorted({p.parent.name for p in files})
index = {c: i for i, c in enumerate(classes)}
with wds.ShardWriter(str(out / "train-%06d.tar"), maxsize=256e6, maxcount=10**9, verbose=0) as sink:
    for p in files:
        sink.write({"__key__": p.stem, "jpg": p.read_bytes(), "cls": str(index[p.parent.name]).encode()})
for p in out.glob("*.tar"):
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(time.perf_counter() - t, CPU - cpu)
""".replace("CPU", CPU)

BUILD = """
import resource, sys, time
from shardtool.build import BuildOptions, build
t, cpu = time.perf_counter(), CPU
build(sys.argv[1], sys.argv[2], BuildOptions(workers=int(sys.argv[3]), layout="imagenet"), progress=False)
print(time.perf_counter() - t, CPU - cpu)
""".replace("CPU", CPU)


def photo(args: tuple[Path, int]) -> int:
    """One photo-like 500x375 JPEG at quality 90 (~100 KB); returns its size."""
    import numpy as np
    from PIL import Image

    root, i = args
    rng = np.random.default_rng(i)
    h, w = 375, 500
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 255, (3, 2))
    img = np.empty((h, w, 3), np.float32)
    for k in range(3):
        wave = 40 * np.sin(x / rng.uniform(10, 60) + y / rng.uniform(20, 90))
        img[..., k] = c[k, 0] + (c[k, 1] - c[k, 0]) * (x / w) * np.cos(y / h * rng.uniform(1, 6)) + wave
    img += rng.normal(0, 23, (h, w, 3))
    wnid = f"n{1440764 + i % CLASSES:08d}"
    path = root / "train" / wnid / f"{wnid}_{i}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def ensure_tree(root: Path, n: int) -> int:
    """Generate the tree once (cached); returns its total JPEG bytes."""
    marker = root / f".complete-{n}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {n} JPEGs under {root} (once) ...", file=sys.stderr)
        t = time.perf_counter()
        with Pool(os.cpu_count()) as pool:
            pool.map(photo, [(root, i) for i in range(n)], chunksize=64)
        print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
        marker.touch()
    return sum(p.stat().st_size for p in (root / "train").rglob("*.JPEG"))


def warm(root: Path) -> None:
    for p in (root / "train").rglob("*.JPEG"):
        p.read_bytes()


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_tar(tree: Path, out: Path, durable: bool) -> tuple[float, float]:
    out = fresh(out)
    t, cpu = time.perf_counter(), cpu_of_children()
    subprocess.run(["tar", "cf", str(out / "tree.tar"), "-C", str(tree), "train"], check=True)
    if durable:
        subprocess.run(["sync", str(out / "tree.tar")], check=True)
    return time.perf_counter() - t, cpu_of_children() - cpu


def time_python(script: str, *args: str) -> tuple[float, float]:
    """(wall, CPU) seconds as measured inside the script, around the work only."""
    proc = subprocess.run([PYTHON, "-c", script, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    wall, cpu = proc.stdout.split()[-2:]
    return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/shardtool-bench/ilsvrc-tree"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/shardtool-bench/out"))
    args = parser.parse_args()

    total = ensure_tree(args.cache, args.images)
    warm(args.cache)
    contenders = {
        "tar cf (no fsync)": lambda: time_tar(args.cache, args.out / "tar", durable=False),
        "tar cf + sync (I/O floor)": lambda: time_tar(args.cache, args.out / "tar", durable=True),
        "webdataset ShardWriter loop": lambda: time_python(
            LOOP, str(args.cache), str(fresh(args.out / "loop"))
        ),
    }
    for w in args.workers:
        contenders[f"shardtool build --workers {w}"] = lambda w=w: time_python(
            BUILD, str(args.cache), str(fresh(args.out / f"build{w}")), str(w)
        )
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeat):
        for name, run in contenders.items():
            wall, used = run()
            times[name].append(wall)
            cpu[name].append(used)
            shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([PYTHON, "-c", "import shardtool.build"], check=True, cwd=REPO)
    startup = time.perf_counter() - t0

    floor = min(times["tar cf + sync (I/O floor)"])
    loop = min(times["webdataset ShardWriter loop"])
    print(
        f"\n{args.images:,} JPEGs, {total / 1e6:,.0f} MB ({total / args.images / 1e3:.0f} KB each), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.repeat} runs each\n"
    )
    head = ["contender", "best s", "median s", "CPU s", "samples/s", "MB/s", "x tar+sync", "x loop"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for name, ts in times.items():
        best = min(ts)
        row = [
            name,
            f"{best:.2f}",
            f"{statistics.median(ts):.2f}",
            f"{statistics.median(cpu[name]):.2f}",
            f"{args.images / best:,.0f}",
            f"{total / 1e6 / best:,.0f}",
            f"{floor / best:.2f}",
            f"{loop / best:.2f}",
        ]
        print("| " + " | ".join(row) + " |")
    print(
        "\nall runs (s): " + "; ".join(f"{n}: {' '.join(f'{t:.1f}' for t in ts)}" for n, ts in times.items())
    )
    print(f"not included above: Python start + `import shardtool.build` = {startup:.1f} s")


if __name__ == "__main__":
    main()
