"""One `hivetrain run` peer against a plain PyTorch loop: what do streaming and hivemind cost?

Both train the same model (ResNet-18 at 64 px by default, torchvision's reference recipe) on the same
images with the same transforms, batch size and loader workers, on the CPU unless --device says otherwise:

  plain    torchvision ImageFolder + DataLoader over the JPEG tree, torch.optim.SGD, nothing else
  hivetrain a single `hivetrain.train.Peer` (DHT, shard leases, shard cache, webdataset stream,
           hivemind.Optimizer) over shards built from the same tree

Throughput is measured over the same number of steps after the same warm-up, in one process, in rounds
that alternate which runs first; the table gives median samples/s, the median of the per-round ratios,
and the peer's data-wait fraction.

    python bench/train.py [--rounds 3] [--steps 40] [--warmup 10] [--batch 64] [--size 64] [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hivetrain import recipe as recipes  # noqa: E402
from hivetrain.options import NetworkOptions, TrainOptions  # noqa: E402
from hivetrain.train import Peer  # noqa: E402
from hivetrain.transforms import Recipe  # noqa: E402
from shardtool import manifest as manifest_io  # noqa: E402

BIN = Path(sys.executable).parent


def dataset(work: Path, classes: int, per_class: int, size: int) -> tuple[Path, Path]:
    data, shards = work / "data", work / "shards"
    if not (shards / "manifest.json").exists():
        subprocess.run([BIN / "shardtool", "synth", data, "--classes", str(classes), "--train-per-class",
                        str(per_class), "--val-per-class", "10", "--size", str(size)], check=True)  # fmt: skip
        subprocess.run([BIN / "shardtool", "-q", "build", data, "--out", shards, "--max-per-shard", "200"],
                       check=True)  # fmt: skip
    return data / "train", shards


def plain_loop(train_dir: Path, args, num_classes: int) -> float:
    """The hand-rolled baseline: ImageFolder + DataLoader + SGD, the reference recipe's transforms."""
    image = Recipe(args.size)
    loader = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(str(train_dir), transform=image.transform(train=True)),
        batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
        persistent_workers=args.workers > 0, pin_memory=args.device == "cuda",
    )  # fmt: skip
    r = recipes.TrainingRecipe(args.model, args.size, batch=args.batch)
    model = recipes.build_model(r, num_classes).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(recipes.param_groups(model, r.weight_decay), lr=0.1, momentum=0.9, nesterov=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    steps, start = 0, None
    while True:
        for images, labels in loader:
            if steps == args.warmup:
                start = time.perf_counter()
            images, labels = (
                images.to(args.device, non_blocking=True),
                labels.to(args.device, non_blocking=True),
            )
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp):
                loss = criterion(model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps += 1
            if steps == args.warmup + args.steps:
                return args.steps * args.batch / (time.perf_counter() - start)


def hivetrain_peer(shards: Path, args, work: Path) -> tuple[float, float]:
    log_dir = work / "peer-logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # metrics.jsonl appends: start from an empty one
    options = TrainOptions(
        shards=str(shards / "manifest.json"), model=args.model, batch=args.batch, image_size=args.size,
        target_global_bsz=4 * args.batch, epochs=1000, val_interval=10**9, workers=args.workers,
        device=args.device, log_dir=str(log_dir), max_steps=10**9, amp=args.amp, channels_last=args.channels_last,
    )  # fmt: skip
    network = NetworkOptions(run_id=f"bench-{time.time_ns()}")
    with Peer.open(options, network) as peer:
        peer.has_val = False  # measure training only
        original = peer._step
        counter = {"n": 0}

        def counted(images, labels):
            counter["n"] += 1
            if counter["n"] > args.warmup + args.steps:
                peer.stop_event.set()
            return original(images, labels)

        peer._step = counted
        peer.run()
    lines = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    window = [m for m in lines if args.warmup <= m["step"] <= args.warmup + args.steps]
    seconds = window[-1]["time"] - window[0]["time"]
    samples = args.batch * (len(window) - 1)
    wait = sum(m["data_wait"] for m in window[1:])
    return samples / seconds, wait / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="resnet18", choices=recipes.MODELS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternating repeats; medians are reported")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-train")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    per_class = max(50, (args.warmup + args.steps + 5) * args.batch // args.classes + 1)
    train_dir, shards = dataset(
        args.work / f"{args.size}px-{args.classes}x{per_class}", args.classes, per_class, args.size
    )
    num_classes = manifest_io.load(shards).num_classes

    plain, ours, waits, ratios = [], [], [], []
    for r in range(args.rounds):  # alternate the order so that a change in machine load hits both alike
        first_plain = r % 2 == 0
        if first_plain:
            plain.append(plain_loop(train_dir, args, num_classes))
        rate, wait = hivetrain_peer(shards, args, args.work)
        ours.append(rate)
        waits.append(wait)
        if not first_plain:
            plain.append(plain_loop(train_dir, args, num_classes))
        ratios.append(ours[-1] / plain[-1])
        print(f"round {r + 1}: plain {plain[-1]:.1f} samples/s, hivetrain {ours[-1]:.1f} ({ratios[-1]:.2f}x)",
              flush=True)  # fmt: skip
    med = statistics.median
    print(f"\n{args.model} at {args.size} px, batch {args.batch}, {args.workers} loader workers, {args.device}, "
          f"{args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds (medians); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| run | samples/s | ratio (median of rounds) | data-wait |")
    print("|---|---|---|---|")
    print(f"| plain PyTorch loop (ImageFolder + DataLoader + SGD) | {med(plain):.1f} | 1.00 | |")
    print(f"| one hivetrain peer (DHT, leases, cache, webdataset, hivemind.Optimizer) | {med(ours):.1f} | "
          f"{med(ratios):.2f} | {100 * med(waits):.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
