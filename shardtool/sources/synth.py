"""`shardtool synth`: a small, learnable image dataset in the Tiny-ImageNet-200 layout, generated offline.

Each class is a combination of a shape (circle, square, triangle, ring, cross, diamond), a fill texture
(solid, stripes, checks) and a hue (spread by the golden ratio so every class has its own), drawn at a
random place and scale over a random gradient background, with pixel noise, and saved as ordinary JPEGs.
A small CNN tells the classes apart well above chance within minutes on a CPU, which is what demos and
end-to-end tests need; nothing about it depends on a download. Pixels are computed with numpy for a
whole class at once, so thousands of images take about a second.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ShardtoolError

MARKER = "synth.json"  # the parameters, so that running the same command again is a no-op
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
TEXTURES = ("solid", "striped", "checked")
_HUE_NAMES = (
    "red",
    "orange",
    "yellow",
    "lime",
    "green",
    "mint",
    "cyan",
    "azure",
    "blue",
    "violet",
    "magenta",
    "rose",
)
_GOLDEN = 0.6180339887


def class_spec(c: int) -> tuple[str, str, float]:
    """(shape, texture, hue in [0, 1)) of class `c`: unique for every class index."""
    return SHAPES[c % len(SHAPES)], TEXTURES[(c // len(SHAPES)) % len(TEXTURES)], (c * _GOLDEN) % 1.0


def class_name(c: int) -> str:
    shape, texture, hue = class_spec(c)
    return f"{_HUE_NAMES[int(hue * len(_HUE_NAMES) + 0.5) % len(_HUE_NAMES)]} {texture} {shape}"


def wnid(c: int) -> str:
    """Made-up wnids outside WordNet's range (real ones are below n15300000), so none is mistaken for one."""
    return f"n9{c:07d}"


def draw(c: int, n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` images of class `c` as uint8 (n, size, size, 3), and their boxes (n, 4) as x0, y0, x1, y1."""
    shape, texture, hue = class_spec(c)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = grid[None, :, None], grid[None, None, :]
    cx, cy = (rng.uniform(-0.35, 0.35, (n, 1, 1)).astype(np.float32) for _ in range(2))
    r = rng.uniform(0.35, 0.6, (n, 1, 1)).astype(np.float32)
    dx, dy = (xx - cx) / r, (yy - cy) / r
    ax, ay = np.abs(dx), np.abs(dy)
    mask = {
        "circle": dx * dx + dy * dy <= 1,
        "square": np.maximum(ax, ay) <= 0.8,
        "triangle": (dy <= 0.8) & (ax <= (dy + 1) * 0.55),
        "ring": (dx * dx + dy * dy <= 1) & (dx * dx + dy * dy >= 0.36),
        "cross": ((ax <= 0.3) & (ay <= 1)) | ((ay <= 0.3) & (ax <= 1)),
        "diamond": ax + ay <= 1,
    }[shape]
    freq = rng.uniform(2.5, 3.5, (n, 1, 1)).astype(np.float32) * np.pi
    light = {
        "solid": np.ones_like(dx, dtype=bool),
        "striped": np.sin(dy * freq) > 0,
        "checked": (np.sin(dx * freq) > 0) ^ (np.sin(dy * freq) > 0),
    }[texture]
    hues = (hue + rng.uniform(-0.015, 0.015, n)) % 1.0
    colour = np.array([colorsys.hsv_to_rgb(h, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)) for h in hues])
    colour = (colour * 255).astype(np.float32)[:, None, None, :]
    # background: a gradient between two dull random colours, in a random direction
    a, b = rng.uniform(40, 200, (2, n, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    t = ((np.cos(angle) * xx + np.sin(angle) * yy) * 0.5 + 0.5)[..., None].astype(np.float32)
    image = a + (b - a) * t
    fill = np.where(light[..., None], colour, colour * 0.45)
    image = np.where(mask[..., None], fill, image)
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    half = r[:, 0, 0] * (size / 2)
    centre_x, centre_y = (cx[:, 0, 0] + 1) * size / 2, (cy[:, 0, 0] + 1) * size / 2
    boxes = np.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=1)
    return pixels, np.clip(np.round(boxes), 0, size - 1).astype(int)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def generate(
    out: str | os.PathLike,
    *,
    classes: int = 10,
    train_per_class: int = 200,
    val_per_class: int = 50,
    size: int = 64,
    seed: int = 0,
) -> bool:
    """Write the dataset into `out`; False if it was already there (the same parameters: nothing to do)."""
    out = Path(out)
    if classes < 1 or train_per_class < 1 or val_per_class < 0 or size < 16:
        raise ShardtoolError("synth: need at least 1 class, 1 train image per class and images of 16+ pixels")
    params = json.dumps(
        {
            "classes": classes,
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "size": size,
            "seed": seed,
        },
        sort_keys=True,
    )
    if (out / "wnids.txt").exists():
        if (out / MARKER).is_file() and (out / MARKER).read_text() == params:
            return False
        raise ShardtoolError(
            f"{out}: already holds a different dataset (wnids.txt exists); choose another folder"
        )
    wnids = [wnid(c) for c in range(classes)]
    val_rows = []
    for c, w in enumerate(wnids):
        rng = np.random.default_rng([seed, c])
        pixels, boxes = draw(c, train_per_class + val_per_class, size, rng)
        folder = out / "train" / w / "images"
        folder.mkdir(parents=True, exist_ok=True)
        box_lines = []
        for i in range(train_per_class):
            name = f"{w}_{i}.JPEG"
            (folder / name).write_bytes(_jpeg(pixels[i]))
            box_lines.append(f"{name}\t" + "\t".join(map(str, boxes[i])))
        (out / "train" / w / f"{w}_boxes.txt").write_text("\n".join(box_lines) + "\n")
        val_rows += [
            (w, pixels[i], boxes[i]) for i in range(train_per_class, train_per_class + val_per_class)
        ]
    order = np.random.default_rng([seed, classes]).permutation(
        len(val_rows)
    )  # val names do not reveal classes
    annotations = []
    if val_rows:
        (out / "val" / "images").mkdir(parents=True, exist_ok=True)
    for n, j in enumerate(order):
        w, pixels, box = val_rows[j]
        name = f"val_{n}.JPEG"
        (out / "val" / "images" / name).write_bytes(_jpeg(pixels))
        annotations.append(f"{name}\t{w}\t" + "\t".join(map(str, box)))
    if annotations:
        (out / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    (out / "words.txt").write_text("".join(f"{w}\t{class_name(c)}\n" for c, w in enumerate(wnids)))
    (out / MARKER).write_text(params)
    (out / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))  # last: marks the dataset complete
    return True
