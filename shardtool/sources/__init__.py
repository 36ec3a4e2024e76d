"""Dataset sources: one module per input layout, each listing the records of a split.

    __init__.py       Record and Source (what every layout produces), layout detection, the registry
    imagenet.py       ILSVRC2012: extracted tree (standard or Kaggle), original archives read in place,
                      val labels (class folders, LOC_val_solution.csv, devkit, --val-labels)
    tiny_imagenet.py  Tiny-ImageNet-200 (wnids.txt, words.txt, val_annotations.txt; unlabeled test)
    cifar.py          CIFAR-10 python batches (pixels, stored as lossless PNG)
    folder.py         any class-per-folder tree (torchvision's ImageFolder convention)
    synth.py          a generated, learnable dataset in the Tiny-ImageNet layout (`shardtool synth`)

A layout only lists: names, labels and where the bytes are. It never decodes images; build workers do
that (shardtool/images.py). Listings are sorted by the record's canonical source name, so the order a
filesystem returns files in never changes a build.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from ..errors import BuildError, LayoutError
from ..manifest import ClassInfo

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)  # torchvision's
WNID = re.compile(r"n\d{8}")

Stamp = tuple[int, ...]
"""What changes when a file is written or replaced: (device, inode, size, modification time in ns)."""


def _stamp(fd: int) -> Stamp:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True, slots=True)
class FileData:
    """Bytes in a file of their own."""

    path: str

    def read(self) -> bytes:
        return self.read_stamped(stamp_first=False)[0]

    def read_stamped(self, *, stamp_first: bool) -> tuple[bytes, Stamp]:
        """The bytes and the file's stamp, taken before the read (`stamp_first`) or after it.

        A stamp taken before one read and another taken after a later read are equal only if the file
        was not written or replaced in between, so a check can be matched with the bytes read later.
        """
        with open(self.path, "rb", buffering=0) as f:  # unbuffered: one read of the whole file
            before = _stamp(f.fileno()) if stamp_first else None
            data = f.readall()
            return data, before or _stamp(f.fileno())


@dataclass(frozen=True, slots=True)
class MemberData:
    """Bytes at a known offset inside an archive (a tar member), read in place without extracting."""

    archive: str
    offset: int
    size: int

    def read(self) -> bytes:
        return self.read_stamped(stamp_first=False)[0]

    def read_stamped(self, *, stamp_first: bool) -> tuple[bytes, Stamp]:
        """The bytes and the archive's stamp (see `FileData.read_stamped`)."""
        fd = os.open(self.archive, os.O_RDONLY)
        try:
            before = _stamp(fd) if stamp_first else None
            data = os.pread(fd, self.size, self.offset)
            stamp = before or _stamp(fd)
        finally:
            os.close(fd)
        if len(data) != self.size:
            raise OSError(f"archive ends inside this member ({len(data)} of {self.size} bytes)")
        return data, stamp


@dataclass(frozen=True, slots=True)
class PixelData:
    """Raw interleaved RGB pixels (CIFAR), encoded as PNG by the build."""

    width: int
    height: int
    pixels: bytes

    def read(self) -> bytes:
        return self.pixels

    def read_stamped(self, *, stamp_first: bool) -> tuple[bytes, Stamp]:
        return self.pixels, ()


@dataclass(frozen=True, slots=True)
class Record:
    """One sample to build.

    Attributes:
        key: the sample key in the shards: unique within the split, no dots or slashes.
        source: canonical relative name (stored in `<key>.json`, orders the listing). For ImageNet it is
            `train/<wnid>/<file>` or `val/<file>` whichever layout the file came from, so the extracted
            tree and the original archives give identical shards.
        label: class index, or None in an unlabeled split.
        wnid: class id (wnid or folder name), or None in an unlabeled split.
        data: where the bytes are.
        where: where a person finds the file, relative to SRC, when that differs from `source`.
    """

    key: str
    source: str
    label: int | None
    wnid: str | None
    data: FileData | MemberData | PixelData
    where: str | None = None

    @property
    def location(self) -> str:
        return self.where or self.source

    @property
    def declared(self) -> str:
        """The type the file name claims: "jpg", "png", "pixels", or its extension."""
        if isinstance(self.data, PixelData):
            return "pixels"
        ext = os.path.splitext(self.source)[1].lower()
        return "jpg" if ext in (".jpg", ".jpeg") else ext.lstrip(".")


@dataclass
class Listing:
    """The records of one split, sorted, plus files left out while listing (path and reason)."""

    records: list[Record]
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class SourceOptions:
    """Options that tell a layout where to find things it cannot discover itself.

    Attributes:
        val_labels: a file with one wnid per line, in val image order (ImageNet flat val folders).
    """

    val_labels: Path | None = None


@dataclass
class Source:
    """A dataset on disk, opened: its classes and a lister per split.

    Attributes:
        layout: the layout name ("imagenet", "imagenet-archives", "tiny-imagenet", "cifar10", "folder").
        root: the SRC folder.
        classes: class list; a class's index is its position.
        listers: split name -> function returning its Listing (listing can take a while, so it is lazy).
        default_splits: the splits built when none are asked for.
        unlabeled: splits without labels (no `.cls` in their samples).
    """

    layout: str
    root: Path
    classes: list[ClassInfo]
    listers: dict[str, Callable[[], Listing]]
    default_splits: tuple[str, ...]
    unlabeled: frozenset[str] = frozenset()

    def listing(self, split: str) -> Listing:
        """The records of `split`; a BuildError naming the splits that exist if it is not one."""
        if split not in self.listers:
            have = ", ".join(self.listers) or "none"
            raise BuildError(
                f"{self.root}: no split {split!r} in this {self.layout} dataset (it has: {have})"
            )
        return self.listers[split]()


def layouts() -> dict[str, object]:
    """The registry: layout name -> module with `detect(root) -> bool` and `open_source(root, options)`.

    Ordered as detection tries them: the most specific layouts first, the generic class folders last.
    """
    from . import cifar, folder, imagenet, tiny_imagenet

    return {
        "imagenet-archives": imagenet.archives,
        "cifar10": cifar,
        "tiny-imagenet": tiny_imagenet,
        "imagenet": imagenet.tree,
        "folder": folder,
    }


EXPECTED = (
    "ILSVRC2012 (train/<wnid>/*.JPEG and val/, or the Kaggle ILSVRC/Data/CLS-LOC tree), "
    "the ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar archives, "
    "Tiny-ImageNet-200 (wnids.txt, train/<wnid>/images/), CIFAR-10 (cifar-10-batches-py/data_batch_1..5), "
    "or class folders (<class>/<image>)"
)


def detect(root: Path) -> str:
    """The name of the first layout that matches `root`, or a LayoutError saying what was expected."""
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    for name, module in layouts().items():
        if module.detect(root):
            return name
    raise LayoutError(
        f"{root}: no known dataset layout found; expected {EXPECTED} (or force one with --layout)"
    )


def open_source(
    root: str | os.PathLike, layout: str | None = None, options: SourceOptions | None = None
) -> Source:
    """Open the dataset at `root`, detecting its layout unless one is given."""
    root = Path(root)
    registry = layouts()
    if layout is None:
        layout = detect(root)
    elif layout not in registry:
        raise LayoutError(f"unknown layout {layout!r} (known: {', '.join(registry)})")
    elif not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    return registry[layout].open_source(root, options or SourceOptions())


# ---- helpers shared by the layouts ----------------------------------------------------------------

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def key_for(name: str) -> str:
    """A sample key from a file name: its stem, with anything but letters, digits, '_' and '-' as '_'."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return _KEY_UNSAFE.sub("_", stem) or "_"


def finish(records: list[Record], skipped: list[dict[str, str]] | None = None) -> Listing:
    """Sort records by source name and make their keys unique.

    A key that collides (two class folders each holding `001.jpg`) becomes the whole source path made
    safe; whatever still collides gets a numeric suffix, in sorted order, so the result is deterministic.
    """
    records.sort(key=lambda r: r.source)
    counts = Counter(r.key for r in records)
    if len(counts) < len(records):
        records = [
            replace(r, key=_KEY_UNSAFE.sub("_", os.path.splitext(r.source)[0])) if counts[r.key] > 1 else r
            for r in records
        ]
        seen: Counter[str] = Counter()
        taken = {r.key for r in records}
        for i, r in enumerate(records):
            seen[r.key] += 1
            if seen[r.key] > 1:
                n = seen[r.key]
                while f"{r.key}_{n}" in taken:
                    n += 1
                taken.add(f"{r.key}_{n}")
                records[i] = replace(r, key=f"{r.key}_{n}")
    return Listing(records, sorted(skipped or [], key=lambda s: s["path"]))


class ImageFile(NamedTuple):
    """A file found by `scan_images`: its name and its path (a string: listing 1.28 M files makes no Paths)."""

    name: str
    path: str


def scan_images(
    folder: str | os.PathLike, root: str | os.PathLike, *, recursive: bool = False
) -> tuple[list[ImageFile], list[dict[str, str]]]:
    """Image files in `folder` (by extension), and the other files there as skipped entries.

    Hidden files (`.DS_Store`, editor droppings) are ignored. Paths in skipped entries are relative to
    `root`, so manifests do not depend on where the dataset sits.
    """
    images: list[ImageFile] = []
    skipped: list[dict[str, str]] = []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as e:
        raise LayoutError(f"{folder}: cannot list ({e.strerror})") from None
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                more, bad = scan_images(entry.path, root, recursive=True)
                images += more
                skipped += bad
        elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            images.append(ImageFile(name, entry.path))
        else:
            skipped.append({"path": rel(entry.path, root), "reason": "not an image file name"})
    return images, skipped


def rel(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` relative to `root`, with forward slashes."""
    path, root = os.fspath(path), os.fspath(root).rstrip(os.sep)
    if path.startswith(root + os.sep):  # the usual case, without relpath's cost
        return path[len(root) + 1 :].replace(os.sep, "/")
    return Path(os.path.relpath(path, root)).as_posix()


def require_images(records: list[Record], skipped: list[dict[str, str]], where: Path, split: str) -> None:
    """An empty split is a user error: say where we looked."""
    if not records:
        extra = f" ({len(skipped)} other files there)" if skipped else ""
        raise BuildError(f"{where}: split {split!r} has no images{extra}")
