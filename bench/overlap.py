"""What a late-landing average costs local SGD: minibatch SGD against local SGD whose averages land at
once, and local SGD whose averages land some local steps after the round began (the overlap of
`--sync diloco`, where the steps taken meanwhile are kept on top of the average: the delta rule).

No peers, no network: K models in one process on the accuracy benchmark's data (`shardtool synth`,
10 classes, 16 px, the same ResNet-18, optimizer, warm-up and cosine schedule as `hivetrain run` with
`--batch 16 --target-global-bsz 64 --epochs 2`), so that only the synchronisation differs between
rows. Minibatch SGD takes K x 16 samples a step; local SGD K models of 16 samples a step, averaged
(parameters and BatchNorm statistics) every H steps; "landing D late": each average is taken at its
round's start and applied D steps later, each model keeping its own D steps. Val top-1 of the final
(averaged) model, per seed, and the mean.

    .venv/bin/python bench/overlap.py [--seeds 3] [--rows mb,H8,H8+8,H8+2,H16,H4+4]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.wan import dataset  # noqa: E402
from hivetrain import recipe as recipes  # noqa: E402

PEERS, BATCH, TARGET, EPOCHS, WARMUP_EPOCHS = 2, 16, 64, 2, 1.0


def load_images(src: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A `shardtool synth` folder (Tiny-ImageNet's layout) as tensors, no augmentation: the rows differ
    only in how the models are synchronised."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    wnids = (src / "wnids.txt").read_text().split()
    if split == "train":
        files = [
            (f, c) for c, w in enumerate(wnids) for f in sorted((src / "train" / w / "images").iterdir())
        ]
    else:
        lines = [
            line.split("\t")[:2] for line in (src / "val" / "val_annotations.txt").read_text().splitlines()
        ]
        files = [(src / "val" / "images" / name, wnids.index(w)) for name, w in lines]
    x = torch.stack([to_tensor(Image.open(f).convert("RGB")) for f, _ in files])
    return x, torch.tensor([c for _, c in files])


def parse_row(row: str) -> tuple[int, int]:
    """`mb`: (0, 0); `H8`: every 8 steps, at once; `H8+2`: every 8 steps, landing 2 steps late."""
    if row == "mb":
        return 0, 0
    every, _, late = row.removeprefix("H").partition("+")
    return int(every), int(late or 0)


def train(x, y, vx, vy, *, every: int, late: int, seed: int) -> float:
    r = recipes.TrainingRecipe(
        model="resnet18", image_size=16, batch=BATCH, target_global_bsz=TARGET, epochs=EPOCHS
    )
    total = math.ceil(EPOCHS * len(x) / TARGET)
    warmup = round(WARMUP_EPOCHS * len(x) / TARGET)
    k, batch = (1, PEERS * BATCH) if every == 0 else (PEERS, BATCH)
    models = [recipes.build_model(r, 10, seed=seed) for _ in range(k)]
    optimizers = [recipes.optimizer(r)(recipes.param_groups(m, r.weight_decay)) for m in models]
    criterion = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    order = torch.cat(
        [torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + e)) for e in range(EPOCHS)]
    )
    state = lambda m: [*m.parameters(), *recipes.batchnorm_buffers(m)]  # noqa: E731
    pending = None  # (step it lands at, each model's state at the round's start, their average)
    for step in range(len(order) // (batch * k)):
        factor = recipes.lr_factor(step * batch * k // TARGET, warmup=warmup, total=total)
        for i, (model, opt) in enumerate(zip(models, optimizers)):
            idx = order[(step * k + i) * batch : (step * k + i + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = r.peak_lr * factor
            opt.zero_grad()
            criterion(model(x[idx]), y[idx]).backward()
            opt.step()
        if k == 1:
            continue
        with torch.no_grad():
            if pending is not None and step >= pending[0]:
                _, starts, average = pending
                pending = None
                for model, start in zip(models, starts):  # the delta rule: keep the steps taken since
                    for t, s, a in zip(state(model), start, average):
                        t.add_(a - s)
            if (step + 1) % every == 0 and pending is None:
                starts = [[t.clone() for t in state(m)] for m in models]
                pending = (step + late, starts, [sum(ts) / k for ts in zip(*starts)])
    with torch.no_grad():
        for ts in zip(*(state(m) for m in models)):  # the last round: a plain average
            ts[0].copy_(sum(ts) / k)
        models[0].eval()
        return 100 * (models[0](vx).argmax(1) == vy).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default="mb,H8,H8+8,H8+2,H16,H4+4", help="mb, or H<every>[+<late>]")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; command: {' '.join(sys.argv)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        src = dataset(Path(tmp), hard=False, per_class=200, size=16).parent.parent / "src"
        x, y = load_images(src, "train")
        vx, vy = load_images(src, "val")
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, vx = (x - mean) / std, (vx - mean) / std
    print(f"\n{len(x)} train / {len(vx)} val images; {PEERS} models x batch {BATCH} (minibatch: {PEERS * BATCH}); "
          f"val top-1 (%)")  # fmt: skip
    print("| synchronisation | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean |")
    print("|---|" + "---:|" * (args.seeds + 1))
    for row in args.rows.split(","):
        every, late = parse_row(row)
        name = (
            "minibatch SGD"
            if every == 0
            else f"local SGD, H={every}" + (f", landing {late} steps late" if late else "")
        )
        started = time.monotonic()
        tops = [train(x, y, vx, vy, every=every, late=late, seed=seed) for seed in range(args.seeds)]
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in tops) + f" | {statistics.fmean(tops):.1f} |"
              f" <!-- {time.monotonic() - started:.0f} s -->", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
