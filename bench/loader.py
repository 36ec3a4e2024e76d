"""Loader throughput: the hivetrain pipeline from local shards vs torchvision ImageFolder + DataLoader,
on the same ~100 KB 500x375 JPEGs with the same training transforms (RandomResizedCrop 224 recipe) and
worker counts, and vs single-process ceilings (PIL decode only; decode + transform).

    .venv/bin/python bench/loader.py [--images 3000] [--workers 0 1 2] [--batch-size 64]

Data is generated once and cached under /tmp/bench-loader (an ImageFolder tree and shards of the same
bytes). Every configuration runs once per round, rounds alternate their order, and the table gives
medians: of rates, and of ratios taken within each round, which cancels most of the drift of a shared
machine. Ratios against a ceiling divide by (ceiling x max(1, workers)). CPU ms/img counts this process
and its worker processes; "CPU efficiency" is ceiling B's CPU per image over ours (1 = no overhead).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivetrain.data import LoaderOptions, ShardRef, ShardStream
from hivetrain.transforms import Recipe, decode_image
from shardtool.writer import ShardWriter

CLASSES = 10
PER_SHARD = 500


def synth_jpeg(rng: np.random.Generator) -> bytes:
    """A 500x375 photo-like JPEG of about 100 KB: smooth colour fields plus grain, quality 90."""
    low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-30, 31, (375, 500, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def prepare(root: Path, n: int) -> tuple[Path, list[ShardRef], list[bytes]]:
    """ImageFolder tree and shards holding the same JPEG bytes (made once, then reused)."""
    folder, shards = root / f"folder-{n}", root / f"shards-{n}"
    rng = np.random.default_rng(0)
    if not (shards / "done").exists():
        print(f"generating {n} JPEGs under {root} ...", file=sys.stderr)
        writer = None
        for i in range(n):
            data, label = synth_jpeg(rng), i % CLASSES
            path = folder / f"c{label:02d}" / f"img{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if i % PER_SHARD == 0:
                if writer:
                    writer.close()
                writer = ShardWriter(shards / f"train-{i // PER_SHARD:06d}.tar", fsync=False)
            writer.write(f"img{i:06d}", {"jpg": data, "cls": str(label).encode()})
        writer.close()
        (shards / "done").touch()
    paths = sorted(folder.glob("*/*.jpg"))
    blobs = [p.read_bytes() for p in paths]  # also warms the page cache for both readers
    for tar in shards.glob("*.tar"):
        tar.read_bytes()
    refs = [ShardRef(t) for t in sorted(shards.glob("*.tar"))]
    return folder, refs, blobs


def measure(fn) -> tuple[float, float]:
    """(images/s, CPU ms per image counting this process and its reaped children) of fn()."""
    before = _cpu()
    start = time.perf_counter()
    count = fn()
    wall = time.perf_counter() - start
    return count / wall, (_cpu() - before) / count * 1000


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def ours(refs: list[ShardRef], recipe: Recipe, workers: int, batch: int) -> int:
    options = LoaderOptions(batch_size=batch, workers=workers, shuffle_buffer=1000, pin_memory=False)
    stream = ShardStream(refs, recipe, options, train=True, num_classes=CLASSES)
    return sum(len(b) for b in stream.batches())


def imagefolder(folder: Path, recipe: Recipe, workers: int, batch: int) -> int:
    dataset = ImageFolder(str(folder), transform=recipe.transform(train=True))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    return sum(len(labels) for _, labels in loader)


def ceiling_decode(blobs: list[bytes]) -> int:
    for data in blobs:
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(blobs)


def ceiling_transform(blobs: list[bytes], recipe: Recipe) -> int:
    """The reference recipe per image (geometry, ToImage, ToDtype, Normalize), as ImageFolder runs it."""
    transform, draft = recipe.transform(train=True), recipe.draft_size(train=True)
    for data in blobs:
        transform(decode_image(data, draft=draft))
    return len(blobs)


def ceiling_batched(blobs: list[bytes], recipe: Recipe, batch: int) -> int:
    """The same arithmetic as our loader, in one process without tar, shuffle or workers: geometry and
    ToImage per image, then stack and one fused normalisation per batch."""
    transform, draft = recipe.image_transform(train=True), recipe.draft_size(train=True)
    for i in range(0, len(blobs), batch):
        recipe.normalize(torch.stack([transform(decode_image(d, draft=draft)) for d in blobs[i : i + batch]]))
    return len(blobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repeats; medians are reported")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-loader"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-image transforms: one thread per process, as in DataLoader workers
    recipe = Recipe(224)
    folder, refs, blobs = prepare(args.dir, args.images)
    mean_kb = sum(map(len, blobs)) / len(blobs) / 1000
    print(
        f"{len(blobs)} JPEGs 500x375, mean {mean_kb:.0f} KB, {len(refs)} shards; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; Pillow {Image.__version__}, torch {torch.__version__}; "
        f"batch {args.batch_size}, median of {args.rounds} interleaved rounds"
    )
    runs = {
        "decode": lambda: ceiling_decode(blobs),
        "ceiling": lambda: ceiling_transform(blobs, recipe),
        "batched": lambda: ceiling_batched(blobs, recipe, args.batch_size),
    }
    for w in args.workers:
        runs[f"ours{w}"] = lambda w=w: ours(refs, recipe, w, args.batch_size)
        runs[f"folder{w}"] = lambda w=w: imagefolder(folder, recipe, w, args.batch_size)
    results: list[dict[str, tuple[float, float]]] = []
    for r in range(args.rounds):
        results.append({})
        names = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in names:
            results[-1][name] = rate, cpu = measure(runs[name])
            print(f"round {r}: {name:10s} {rate:6.0f} img/s  {cpu:5.2f} CPU ms/img", file=sys.stderr)

    def rate(name: str) -> float:
        return statistics.median(r[name][0] for r in results)

    def cpu(name: str) -> float:
        return statistics.median(r[name][1] for r in results)

    def ratio(name: str, base: str, scale: int = 1) -> float:
        """Median over rounds of the ratio measured within each round (robust to a shared machine)."""
        return statistics.median(r[name][0] / (r[base][0] * scale) for r in results)

    print(
        f"single-process ceilings (median img/s, CPU ms/img): A = PIL decode only {rate('decode'):.0f} "
        f"({cpu('decode'):.2f}); B = decode + reference transform per image {rate('ceiling'):.0f} "
        f"({cpu('ceiling'):.2f}); C = decode + the same transform split as our loader runs it (uint8 per "
        f"image, normalise per batch) {rate('batched'):.0f} ({cpu('batched'):.2f})\n"
    )
    print(
        "| workers | hivetrain img/s | ImageFolder img/s | hivetrain / ImageFolder | "
        "hivetrain / (B x workers) | hivetrain / (C x workers) | hivetrain / (A x workers) | "
        "CPU ms/img hivetrain | CPU ms/img ImageFolder | CPU efficiency vs B |"
    )
    print("|---" * 10 + "|")
    for w in args.workers:
        mine, theirs, n = f"ours{w}", f"folder{w}", max(1, w)
        print(
            f"| {w} | {rate(mine):.0f} | {rate(theirs):.0f} | {ratio(mine, theirs):.2f} | "
            f"{ratio(mine, 'ceiling', n):.0%} | {ratio(mine, 'batched', n):.0%} | {ratio(mine, 'decode', n):.0%} | "
            f"{cpu(mine):.2f} | {cpu(theirs):.2f} | {cpu('ceiling') / cpu(mine):.0%} |"
        )


if __name__ == "__main__":
    main()
