"""`shardtool synth`: the generated dataset has the Tiny-ImageNet layout, is reproducible, and is learnable."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shardtool.build import BuildOptions, build
from shardtool.errors import ShardtoolError
from shardtool.sources import detect
from shardtool.sources.synth import generate
from tests import datagen
from tests.util import cli


def test_layout_and_reproducibility(tmp_path):
    proc = cli(
        "shardtool",
        "synth",
        tmp_path / "a",
        "--classes",
        "3",
        "--train-per-class",
        "4",
        "--val-per-class",
        "2",
        "--size",
        "32",
        check=True,
    )
    assert "wrote 18 images of 3 classes" in proc.stderr
    a = tmp_path / "a"
    assert detect(a) == "tiny-imagenet"
    wnids = (a / "wnids.txt").read_text().split()
    assert len(wnids) == 3 and all((a / "train" / w / "images" / f"{w}_3.JPEG").is_file() for w in wnids)
    rows = [line.split("\t") for line in (a / "val" / "val_annotations.txt").read_text().splitlines()]
    assert len(rows) == 6 and {r[1] for r in rows} == set(wnids)
    im = Image.open(a / "val" / "images" / "val_0.JPEG")
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
    generate(tmp_path / "b", classes=3, train_per_class=4, val_per_class=2, size=32)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert not generate(
        a, classes=3, train_per_class=4, val_per_class=2, size=32
    )  # the same again: nothing to do
    with pytest.raises(ShardtoolError, match="already holds a different dataset"):
        generate(a, classes=4)


def test_a_small_cnn_learns_it_from_the_built_shards(tmp_path):
    """End to end: synth -> build -> webdataset -> a tiny CNN well above chance (10 classes: 10%)."""
    generate(tmp_path / "src", classes=10, train_per_class=80, val_per_class=20, size=32)
    build(tmp_path / "src", tmp_path / "out", BuildOptions(workers=0), progress=False)
    from shardtool.manifest import load

    manifest = load(tmp_path / "out")

    def tensors(split):
        samples = datagen.read_split(manifest, split)
        x = np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"]))) for s in samples])
        return torch.tensor(x).permute(0, 3, 1, 2).float() / 255, torch.tensor(
            [int(s["cls"]) for s in samples]
        )

    (xt, yt), (xv, yv) = tensors("train"), tensors("val")
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(12):
        for batch in torch.randperm(len(yt)).split(64):
            loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(xv).argmax(1) == yv).float().mean().item()
    assert accuracy > 0.5, accuracy
