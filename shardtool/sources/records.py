"""What every layout produces: records (a sample's name, label and where its bytes are), listings, sources."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError
from ..manifest import ClassInfo

Stamp = tuple[int, ...]
"""What changes when a file is written or replaced: (device, inode, size, modification time in ns)."""


def _stamp(fd: int) -> Stamp:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_stamped(path: str, read: Callable[[int], bytes], *, stamp_first: bool) -> tuple[bytes, Stamp]:
    """`read(fd)` of the file at `path`, and its stamp taken before the read (`stamp_first`) or after it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        before = _stamp(fd) if stamp_first else None
        data = read(fd)
        return data, before or _stamp(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    with open(fd, "rb", buffering=0, closefd=False) as f:  # unbuffered: one read of the whole file
        return f.readall()


class _Bytes:
    """Where a sample's bytes are; subclasses say how to read them with a stamp."""

    __slots__ = ()

    def read(self) -> bytes:
        return self.read_stamped(stamp_first=False)[0]

    def read_stamped(self, *, stamp_first: bool) -> tuple[bytes, Stamp]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class FileData(_Bytes):
    """Bytes in a file of their own."""

    path: str

    def read_stamped(self, *, stamp_first: bool) -> tuple[bytes, Stamp]:
        """The bytes and the file's stamp, taken before the read (`stamp_first`) or after it.

        A stamp taken before one read and another taken after a later read are equal only if the file
        was not written or replaced in between, so a check can be matched with the bytes read later.
        """
        return _read_stamped(self.path, _read_all, stamp_first=stamp_first)


@dataclass(frozen=True, slots=True)
class MemberData(_Bytes):
    """Bytes at a known offset inside an archive (a tar member), read in place without extracting."""

    archive: str
    offset: int
    size: int

    def read_stamped(self, *, stamp_first: bool) -> tuple[bytes, Stamp]:
        """The bytes and the archive's stamp (see `FileData.read_stamped`)."""
        data, stamp = _read_stamped(
            self.archive, lambda fd: os.pread(fd, self.size, self.offset), stamp_first=stamp_first
        )
        if len(data) != self.size:
            raise OSError(f"archive ends inside this member ({len(data)} of {self.size} bytes)")
        return data, stamp


@dataclass(frozen=True, slots=True)
class PixelData(_Bytes):
    """Raw interleaved RGB pixels (CIFAR), encoded as PNG by the build."""

    width: int
    height: int
    pixels: bytes

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
        layout: the layout's name in `layouts.LAYOUTS`.
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
