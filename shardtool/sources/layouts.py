"""The layout table: every input layout `shardtool build` reads, and detection, which tries them in order.

The table is the one list of layouts: `--layout` (its choices and its help), detection and the error for
a folder that fits none all read it. A layout's module is imported only when the layout is used, so the
command line can read the table without loading numpy or tarfile.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import LayoutError
from .records import Source, SourceOptions


class LayoutModule(Protocol):
    """What implements a layout (a module, or a namespace where one module holds two layouts)."""

    def detect(self, root: Path) -> bool: ...

    def open_source(self, root: Path, options: SourceOptions) -> Source: ...


@dataclass(frozen=True)
class Layout:
    """One input layout.

    Attributes:
        name: what `--layout` and the manifest call it (the implementation's `Source.layout`).
        impl: where it is implemented, under shardtool.sources: "module" or "module:attribute".
        expects: what it looks for in SRC, for `--help` and for the error when nothing fits.
    """

    name: str
    impl: str
    expects: str

    def load(self) -> LayoutModule:
        module, _, attribute = self.impl.partition(":")
        loaded = importlib.import_module(f"{__package__}.{module}")
        return getattr(loaded, attribute) if attribute else loaded


LAYOUTS = (
    Layout(
        "imagenet-archives",
        "imagenet:archives",
        "ILSVRC2012 archives (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar)",
    ),
    Layout("cifar10", "cifar", "CIFAR-10 (cifar-10-batches-py/data_batch_1..5)"),
    Layout("tiny-imagenet", "tiny_imagenet", "Tiny-ImageNet-200 (wnids.txt, train/<wnid>/images/)"),
    Layout(
        "imagenet",
        "imagenet:tree",
        "ILSVRC2012 (train/<wnid>/*.JPEG and val/, or the Kaggle ILSVRC/Data/CLS-LOC tree)",
    ),
    Layout("folder", "folder", "class folders (<class>/<image>)"),
)
"""Ordered as detection tries them: the most specific first (a Tiny-ImageNet tree also looks like an
ImageNet one), the generic class folders last."""

NAMES = tuple(layout.name for layout in LAYOUTS)


def detect(root: Path) -> str:
    """The name of the first layout that matches `root`, or a LayoutError saying what was expected."""
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    for layout in LAYOUTS:
        if layout.load().detect(root):
            return layout.name
    *others, last = (layout.expects for layout in LAYOUTS)
    raise LayoutError(
        f"{root}: no known dataset layout found; expected {', '.join(others)}, or {last} "
        "(or force one with --layout)"
    )


def open_source(
    root: str | os.PathLike, layout: str | None = None, options: SourceOptions | None = None
) -> Source:
    """Open the dataset at `root`, detecting its layout unless one is given."""
    root = Path(root)
    if layout is None:
        layout = detect(root)
    elif layout not in NAMES:
        raise LayoutError(f"unknown layout {layout!r} (known: {', '.join(NAMES)})")
    elif not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    return LAYOUTS[NAMES.index(layout)].load().open_source(root, options or SourceOptions())
