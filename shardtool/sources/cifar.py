"""CIFAR-10 python batches: `data_batch_1..5` (train), `test_batch` (val), `batches.meta` (class names).

Each batch is a pickle of {b"data": uint8 array (N, 3072) with R, G and B planes, b"labels": [...]}.
Pickles can run code when loaded, so they are read with an unpickler that only rebuilds numpy arrays.
Samples are stored as lossless PNG (the pixels are the data; a JPEG would change them).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import LayoutError
from ..manifest import ClassInfo
from .records import Listing, PixelData, Record, Source, SourceOptions
from .scan import finish, rel

NAME = "cifar10"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_BATCH = "test_batch"
META = "batches.meta"


def batches_dir(root: Path) -> Path | None:
    for candidate in (root, root / FOLDER):
        if (candidate / META).is_file() and (candidate / TRAIN_BATCHES[0]).is_file():
            return candidate
    return None


def detect(root: Path) -> bool:
    return batches_dir(root) is not None


class _NumpyOnly(pickle.Unpickler):
    """An unpickler for CIFAR batches that refuses anything but numpy arrays and plain containers."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_batch(path: Path) -> dict:
    """One batch file, decoded with byte-string keys (as CIFAR's own loader does)."""
    try:
        with open(path, "rb") as f:
            return _NumpyOnly(f, encoding="bytes").load()
    except FileNotFoundError:
        raise LayoutError(f"{path}: missing") from None
    except Exception as e:
        raise LayoutError(f"{path}: not a CIFAR-10 python batch ({e})") from None


def open_source(root: Path, options: SourceOptions) -> Source:
    folder = batches_dir(root)
    if folder is None:
        raise LayoutError(
            f"{root}: not CIFAR-10 (expected {META} and {TRAIN_BATCHES[0]} here or in {FOLDER}/)"
        )
    meta = load_batch(folder / META)
    try:
        names = [n.decode() for n in meta[b"label_names"]]
    except (KeyError, AttributeError):
        raise LayoutError(f"{folder / META}: has no label_names") from None
    classes = [ClassInfo(n, n) for n in names]

    def lister(batch_names: tuple[str, ...]):
        def list_split() -> Listing:
            records = []
            for batch_name in batch_names:
                path = folder / batch_name
                if not path.is_file() and batch_name != TRAIN_BATCHES[0]:
                    raise LayoutError(f"{path}: missing")
                records += _batch_records(path, rel(path, root), names)
            return finish(records)

        return list_split

    listers = {"train": lister(TRAIN_BATCHES)}
    if (folder / VAL_BATCH).is_file():
        listers["val"] = lister((VAL_BATCH,))
    return Source(NAME, root, classes, listers, tuple(listers))


def _batch_records(path: Path, where: str, names: list[str]) -> list[Record]:
    batch = load_batch(path)
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = [int(x) for x in batch[b"labels"]]
    except (KeyError, TypeError, ValueError) as e:
        raise LayoutError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise LayoutError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}")
    bad = next((x for x in labels if not 0 <= x < len(names)), None)
    if bad is not None:
        raise LayoutError(f"{path}: label {bad} is not a class of batches.meta")
    # planes (R, G, B) of 32x32 -> interleaved RGB rows
    pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    stem = path.name
    return [
        Record(
            f"{stem}_{i:05d}",
            f"{where}/{i:05d}",
            labels[i],
            names[labels[i]],
            PixelData(32, 32, pixels[i].tobytes()),
        )
        for i in range(len(labels))
    ]
