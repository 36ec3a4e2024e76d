"""Helpers the layouts share: finding image files, naming and ordering their records, empty-split errors."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from ..errors import BuildError, LayoutError
from .records import FileData, Listing, Record

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
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


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


def subdirs(folder: Path) -> list[str]:
    """The names of the folders in `folder` (hidden ones left out), sorted."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def loose_files(folder: Path, root: Path) -> list[dict[str, str]]:
    """Skipped entries for the files directly in `folder`, which holds class folders only."""
    with os.scandir(folder) as it:
        return [
            {"path": rel(Path(e.path), root), "reason": "not in a class folder"}
            for e in it
            if not e.is_dir() and not e.name.startswith(".")
        ]


def file_record(
    found: ImageFile, root: Path, label: int | None, wnid: str | None, *, source: str | None = None
) -> Record:
    """The record of an image file: `source` is its canonical name (default: its path under `root`)."""
    where = rel(found.path, root)
    source = where if source is None else source
    return Record(
        key_for(found.name), source, label, wnid, FileData(found.path), None if where == source else where
    )


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
