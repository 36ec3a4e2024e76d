"""A small, real shard set (JPEG samples, manifest) for tests of the transport and the data plane.

Written with the production ShardWriter and Manifest, so what transport and streaming tests read is
exactly what `shardtool build` produces; images are class-coloured so simple models can learn them.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image

from shardtool.manifest import ClassInfo, Manifest, Split
from shardtool.writer import ShardWriter

PALETTE = [(220, 40, 40), (40, 200, 60), (50, 70, 220), (230, 200, 40), (200, 60, 200), (40, 200, 210)]


def jpeg(label: int, size: int = 32, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    base = PALETTE[label % len(PALETTE)]
    img = Image.new("RGB", (size, size), tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in base))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shard_set(
    out: str | Path,
    splits: dict[str, tuple[int, int]] | None = None,
    num_classes: int = 4,
    image_size: int = 32,
    payload: int = 0,
) -> Manifest:
    """Write shards for each split (`{"train": (num_shards, samples_per_shard)}`) and manifest.json.

    `payload` adds that many bytes of padding per sample (an extra `.bin` member) for tests that need
    larger shards without the cost of encoding larger images.
    """
    out = Path(out)
    splits = splits or {"train": (4, 8), "val": (1, 8)}
    result = {}
    index = 0
    for split, (num_shards, per_shard) in splits.items():
        shards = []
        for s in range(num_shards):
            with ShardWriter(out / f"{split}-{s:06d}.tar", fsync=False) as w:
                for _ in range(per_shard):
                    label = index % num_classes
                    fields = {
                        "jpg": jpeg(label, image_size, seed=index),
                        "cls": str(label).encode(),
                        "json": json.dumps({"wnid": f"c{label}", "source": f"{split}/{index}.jpg"}).encode(),
                    }
                    if payload:
                        fields["bin"] = random.Random(index).randbytes(payload)
                    w.write(f"{split}_{index:08d}", fields)
                    index += 1
            shards.append(w.shard)
        result[split] = Split(shards)
    manifest = Manifest(
        dataset="testset",
        layout="folder",
        classes=[ClassInfo(f"c{i}", f"class {i}") for i in range(num_classes)],
        splits=result,
        build={"seed": 0},
    )
    manifest.save(out / "manifest.json")
    manifest.origin = str(out / "manifest.json")
    return manifest
