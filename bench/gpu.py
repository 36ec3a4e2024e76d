"""One GPU, one table: ResNet-50's training ceiling, `hivetrain run` with CPU and GPU JPEG decoding, and
nvJPEG against PIL.

Every row is measured here, in this order of the table:

  ceiling        ResNet-50 training steps on random tensors already on the GPU: bf16 autocast, channels_last,
                 the model, loss and SGD of `hivetrain run`'s recipe, no data loading: what the GPU can do
  --decode cpu   `hivetrain run` alone (its own DHT, no --initial-peer) on local ImageNet-like shards, PIL in
                 the loader workers: img/s over the steps after warm-up (as a fraction of the ceiling), the
                 data-wait fraction of that window, and the GPU's mean utilisation over it
  --decode gpu   the same with nvJPEG: the workers only read the tars, the trainer decodes on the GPU
  PIL            full-size JPEG decode to RGB on the CPU, one process, then one process per core
  nvJPEG         `torchvision.io.decode_jpeg(list_of_tensors, device="cuda")` on batches, against PIL on all
                 cores

Data: --images photo-like 500x375 JPEGs of ~100 KB (bench/loader.py's generator) in a class-per-folder
tree, built with `shardtool build --max-per-shard`, made once per size under --work. Each peer trains with
a global batch of 4 local batches (hivemind steps every 4 local steps, as a peer of a larger run would).
GPU utilisation: nvidia-smi's utilization.gpu (the share of time a kernel ran) every 200 ms, averaged
over each row's timed window. Medians of 3 timed windows, except the peers (one run each; a run's
steps after warm-up make its window).

    python bench/gpu.py                 # one CUDA GPU (H100/H200 class): about 4 minutes; refuses a CPU
    python bench/gpu.py --smoke         # any machine, CPU included: tiny sizes, the same code paths;
                                        # without CUDA the GPU rows say "skipped: no CUDA" (and --decode gpu
                                        # falls back to PIL, with hivetrain's warning)
    python bench/gpu.py --out DIR       # also results.json, each peer's metrics.jsonl and stderr in DIR

On the lent GPU machine (bare, offline; its python3 has torch and torchvision but not hivemind, webdataset
or their needs), `bench/gpu.sh` installs the wheels carried in .whl/ into /tmp/site and runs this script:

    here, once (PyPI reachable):  bash bench/gpu.sh --download       # ~20 MB of wheels into .whl/ (git-ignored)
    on the device, `run` with:    command "bash bench/gpu.sh --out $OUT", carry [".whl"], timeout_s 600

The table is printed last (the reply's output tail holds it); $OUT brings back results.json and the logs.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.loader import synth_jpeg  # noqa: E402
from hivetrain import recipe as recipes  # noqa: E402
from hivetrain.transforms import decode_image  # noqa: E402

CLASSES = 10
LOCAL_STEPS_PER_GLOBAL = 4
ROUNDS = 3
FULL = dict(
    images=4096, per_shard=128, batch=256, size=224, steps=150, warmup=20, single=400, decode_batch=128
)
SMOKE = dict(images=48, per_shard=8, batch=8, size=32, steps=6, warmup=4, single=24, decode_batch=8)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


@dataclass
class Row:
    """One line of the table: `rate` None means skipped (`note` says why); `base` is the key of the row it
    is compared with; `start`/`end` (wall clock) bound the window whose GPU utilisation is reported."""

    name: str
    short: str
    rate: float | None = None
    base: str | None = None
    data_wait: float | None = None
    gpu_util: float | None = None
    note: str = ""
    start: float | None = None
    end: float | None = None


class GpuUtilization:
    """nvidia-smi's utilization.gpu sampled every 200 ms in the background; nothing without CUDA."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuUtilization:
        smi = shutil.which("nvidia-smi")
        if torch.cuda.is_available() and smi:
            query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200", "-i", "0"]
            self._proc = subprocess.Popen([smi, *query], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip())))
            except ValueError:
                continue  # "[N/A]" on GPUs that do not report it

    def mean(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return statistics.mean(inside) if inside else None

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


# ---- data ------------------------------------------------------------------------------------------


def _write_jpeg(task: tuple[Path, int]) -> None:
    folder, i = task
    path = folder / f"c{i % CLASSES:02d}" / f"img{i:06d}.jpg"
    path.write_bytes(synth_jpeg(np.random.default_rng(i)))


def prepare(work: Path, images: int, per_shard: int) -> tuple[Path, list[bytes]]:
    """The shards' manifest and the JPEG bytes: a class-per-folder tree built with `shardtool build`."""
    root = work / f"{images}x500x375"
    tree, shards = root / "data" / "train", root / "shards"
    if not (shards / "manifest.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        for c in range(CLASSES):
            (tree / f"c{c:02d}").mkdir(parents=True)
        print(f"generating {images} JPEGs under {root} ...", file=sys.stderr, flush=True)
        with mp.get_context("fork").Pool() as pool:
            pool.map(_write_jpeg, [(tree, i) for i in range(images)], chunksize=16)
        build = ["build", tree.parent, "--out", shards, "--layout", "folder", "--name", "bench-gpu",
                 "--max-per-shard", str(per_shard), "--workers", str(min(8, os.cpu_count() or 1))]  # fmt: skip
        _tool("shardtool", "-q", *build, timeout=600)
    blobs = [p.read_bytes() for p in sorted(tree.glob("*/*.jpg"))]
    for tar in shards.glob("*.tar"):
        tar.read_bytes()  # into the page cache, as a warm local shard cache would be
    return shards / "manifest.json", blobs


def _tool(name: str, *args, timeout: float) -> subprocess.CompletedProcess:
    """Run `shardtool`/`hivetrain` with this interpreter (no console scripts needed: a bare machine has
    none), the repository on PYTHONPATH; a failure raises BenchError with its last line of stderr."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    cmd = [sys.executable, "-m", f"{name}.cli", *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{name} {args[0]} did not finish in {timeout:.0f} s") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{name} {' '.join(map(str, args[:2]))} exited {proc.returncode}: {last}")
    return proc


# ---- rows ------------------------------------------------------------------------------------------


def timed_rounds(run: Callable[[], int], rounds: int = ROUNDS) -> tuple[float, float, float]:
    """(median items/s, start, end) of `rounds` calls of `run`, each returning how many items it did."""
    rates, start = [], time.time()
    for _ in range(rounds):
        begin = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - begin))
    return statistics.median(rates), start, time.time()


def ceiling(args, device: torch.device) -> Row:
    """Training steps of the peer's model on tensors already on the device: no data path at all."""
    recipe = recipes.TrainingRecipe(args.model, args.size, batch=args.batch)
    model = recipes.build_model(recipe, CLASSES).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        recipes.param_groups(model, recipe.weight_decay), lr=0.1, momentum=0.9, nesterov=True
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (args.batch,), device=device)

    def steps(n: int) -> int:
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = criterion(model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return n * args.batch

    steps(args.warmup)
    per_round = max(1, args.steps // ROUNDS)
    rate, start, end = timed_rounds(lambda: steps(per_round))
    precision = "bf16" if device.type == "cuda" else "fp32"
    name = f"{args.model} {precision} channels_last training, synthetic tensors on the device (ceiling)"
    note = f"{ROUNDS} x {per_round} steps of {args.batch} after {args.warmup}"
    return Row(name, "ceiling", rate, note=note, start=start, end=end)


def peer(args, decode: str, manifest: Path, device: torch.device, out: Path | None) -> Row:
    """`hivetrain run` alone; img/s and data-wait over its local steps after the warm-up ones."""
    log_dir = args.work / f"peer-{decode}"
    shutil.rmtree(log_dir, ignore_errors=True)  # metrics.jsonl appends: start from an empty one
    max_steps = math.ceil((args.warmup + args.steps + 1) / LOCAL_STEPS_PER_GLOBAL)
    proc = _tool(
        "hivetrain", "run", "--shards", manifest, "--run-id", f"bench-gpu-{decode}-{time.time_ns()}",
        "--model", args.model, "--image-size", args.size, "--batch", args.batch,
        "--target-global-bsz", LOCAL_STEPS_PER_GLOBAL * args.batch, "--epochs", 1000, "--max-steps", max_steps,
        "--workers", args.workers, "--decode", decode, "--device", device.type, "--amp", "--channels-last",
        "--log-dir", log_dir, timeout=900,
    )  # fmt: skip
    if out is not None:
        shutil.copy(log_dir / "metrics.jsonl", out / f"peer-{decode}-metrics.jsonl")
        (out / f"peer-{decode}-stderr.log").write_text(proc.stderr)
    summary = re.search(r"(\d+) local steps, (\d+) samples", proc.stdout)
    if summary is None:
        raise BenchError(f"hivetrain run --decode {decode}: no summary line in its output")
    local_steps, samples = map(int, summary.groups())
    lines = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    window = [m for m in lines if m.get("step", 0) >= args.warmup]
    if len(window) < 2:
        raise BenchError(f"hivetrain run --decode {decode} made {local_steps} steps, too few to time")
    seconds = window[-1]["time"] - window[0]["time"]
    mean_batch = samples / local_steps  # batches are full except where a worker's run of shards ends
    note = [f"{len(window) - 1} steps of {mean_batch:.0f} after {args.warmup}; {args.workers} workers"]
    if decode == "gpu" and device.type != "cuda":
        fell_back = "CUDA is not available" in proc.stderr
        note.append("no CUDA: fell back to PIL, as hivetrain warned" if fell_back else "no CUDA, no warning")
    return Row(
        f"hivetrain run --decode {decode}",
        f"--decode {decode}",
        mean_batch * (len(window) - 1) / seconds,
        base="ceiling",
        data_wait=sum(m["data_wait"] for m in window[1:]) / seconds,
        note="; ".join(note),
        start=window[0]["time"],
        end=window[-1]["time"],
    )


_BLOBS: list[bytes] = []  # what the forked decode processes read


def _pil_decode(bounds: tuple[int, int]) -> int:
    for data in _BLOBS[bounds[0] : bounds[1]]:
        decode_image(data)  # full size, RGB: what nvJPEG produces
    return bounds[1] - bounds[0]


def pil_rows(blobs: list[bytes], single: int) -> list[Row]:
    """PIL decode in this process, then in one forked process per core (before CUDA starts here)."""
    _BLOBS[:] = blobs
    one, _, _ = timed_rounds(lambda: _pil_decode((0, min(single, len(blobs)))))
    rows = [
        Row(
            "JPEG decode 500x375, PIL, 1 process",
            "PIL 1 process",
            one,
            note=f"{min(single, len(blobs))} images",
        )
    ]
    cores = os.cpu_count() or 1
    chunk = max(1, len(blobs) // (4 * cores))
    parts = [(i, min(i + chunk, len(blobs))) for i in range(0, len(blobs), chunk)]
    with mp.get_context("fork").Pool(cores) as pool:
        pool.map(_pil_decode, parts[:cores])  # start the processes and warm them up
        rate, _, _ = timed_rounds(lambda: sum(pool.map(_pil_decode, parts)))
    rows.append(Row(f"JPEG decode 500x375, PIL, {cores} processes", f"PIL {cores} processes", rate,
                    base="pil1", note=f"{len(blobs)} images"))  # fmt: skip
    return rows


def nvjpeg(blobs: list[bytes], batch: int, cores: int) -> Row:
    """torchvision's batched nvJPEG decode from host tensors (the copy to the GPU included)."""
    name = f"JPEG decode 500x375, nvJPEG, batches of {batch}"
    if not torch.cuda.is_available():
        return Row(name, "nvJPEG", base="pil", note="skipped: no CUDA")
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def decode_all() -> int:
        for i in range(0, len(tensors), batch):
            decode_jpeg(tensors[i : i + batch], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        return len(tensors)

    decode_jpeg(tensors[:batch], mode=ImageReadMode.RGB, device="cuda")  # nvJPEG's handles, once
    torch.cuda.synchronize()
    rate, start, end = timed_rounds(decode_all)
    return Row(name, "nvJPEG", rate, base="pil", note=f"{len(blobs)} images", start=start, end=end)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- table -----------------------------------------------------------------------------------------


def table(rows: dict[str, Row]) -> str:
    """The markdown table: ratios against each row's base; GPU utilisation where a window was timed
    ("n/a": no CUDA or no nvidia-smi)."""
    lines = ["| measurement | img/s | ratio | data-wait | GPU util | notes |", "|---|---:|---|---:|---:|---|"]
    for row in rows.values():
        if row.rate is None:
            lines.append(f"| {row.name} | {row.note} | | | | |")
            continue
        base = rows[row.base] if row.base else None
        ratio = f"{row.rate / base.rate:.2f} x {base.short}" if base and base.rate else "1.00"
        wait = "" if row.data_wait is None else f"{100 * row.data_wait:.1f}%"
        util = "" if row.start is None else "n/a" if row.gpu_util is None else f"{row.gpu_util:.0f}%"
        lines.append(f"| {row.name} | {row.rate:.1f} | {ratio} | {wait} | {util} | {row.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for any machine (CI runs this)")
    for name, value in FULL.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, help=f"[{value}; --smoke: {SMOKE[name]}]"
        )
    parser.add_argument("--model", default="resnet50", choices=recipes.MODELS)
    parser.add_argument("--workers", type=int, default=None, help="peer loader workers [cores - 4, 2..12]")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-gpu"), help="data, shards, peer logs")
    parser.add_argument("--out", type=Path, help="write results.json and the peers' logs here")
    args = parser.parse_args()
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    cores = os.cpu_count() or 1
    if args.workers is None:
        args.workers = 2 if args.smoke else max(2, min(12, cores - 4))
    try:
        rows = run(args, cores)
    except BenchError as e:
        sys.exit(f"bench/gpu.py: {e}")
    print(table(rows))


def run(args, cores: int) -> dict[str, Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise BenchError("no CUDA device here (the full sizes need a GPU); --smoke runs tiny sizes on a CPU")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def measured(row: Row) -> Row:
        rate = row.note if row.rate is None else f"{row.rate:.1f} img/s"
        print(f"[{time.perf_counter() - began:3.0f} s] {row.name}: {rate}", file=sys.stderr, flush=True)
        return row

    manifest, blobs = prepare(args.work, args.images, args.per_shard)
    with GpuUtilization() as gpu:
        pil1, pil = map(measured, pil_rows(blobs, args.single))  # forked before this process starts CUDA
        top = measured(ceiling(args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the peers run in processes of their own
        rows = dict(
            ceiling=top,
            cpu=measured(peer(args, "cpu", manifest, device, args.out)),
            gpu=measured(peer(args, "gpu", manifest, device, args.out)),
            pil1=pil1,
            pil=pil,
            nvjpeg=measured(nvjpeg(blobs, args.decode_batch, cores)),
        )
    for row in rows.values():
        if row.start is not None and device.type == "cuda":
            row.gpu_util = gpu.mean(row.start, row.end)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no CUDA)"
    print(f"\n{name}, {cores} cores; torch {torch.__version__}; {args.model} at {args.size} px, batch "
          f"{args.batch}; {len(blobs)} JPEGs in shards of {args.per_shard}; "
          f"{time.perf_counter() - began:.0f} s in all")  # fmt: skip
    if args.out is not None:
        results = dict(device=name, cores=cores, torch=torch.__version__, options=vars(args),
                       rows={k: asdict(r) for k, r in rows.items()})  # fmt: skip
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return rows


if __name__ == "__main__":
    main()
