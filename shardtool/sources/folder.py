"""Any class-per-folder tree, as torchvision's ImageFolder reads it.

    SRC/<class>/**/<image>                  one split, "train"
    SRC/{train,val,test}/<class>/**/<image> one split per folder; classes come from train/

Class index = position of the folder name in sorted order. Folders named like wnids get WordNet names.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BuildError, LayoutError
from ..manifest import ClassInfo
from .imagenet import wordnet_lemmas
from .records import Listing, Source, SourceOptions
from .scan import IMAGE_EXTENSIONS, file_record, finish, loose_files, require_images, scan_images, subdirs

NAME = "folder"
SPLITS = ("train", "val", "test")


def _subdirs(folder: Path) -> list[str]:
    """The folders in `folder`; none where it cannot be listed (detection probes folders of any layout)."""
    try:
        return subdirs(folder)
    except OSError:
        return []


def _split_roots(root: Path) -> dict[str, Path]:
    """{split: folder of class folders}: train/val/test when SRC holds only those, else SRC as "train"."""
    subdirs = _subdirs(root)
    if "train" in subdirs and set(subdirs) <= set(SPLITS) and _subdirs(root / "train"):
        return {s: root / s for s in SPLITS if s in subdirs}
    return {"train": root}


def _has_image(folder: Path) -> bool:
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def detect(root: Path) -> bool:
    train = _split_roots(root)["train"]
    return any(_has_image(train / c) for c in _subdirs(train))


def open_source(root: Path, options: SourceOptions) -> Source:
    roots = _split_roots(root)
    names = _subdirs(roots["train"])
    if not names:
        raise LayoutError(f"{roots['train']}: no class folders (expected <class>/<image> files)")
    lemmas = wordnet_lemmas()
    classes = [ClassInfo(n, lemmas.get(n, n)) for n in names]
    index = {n: i for i, n in enumerate(names)}

    def lister(split: str, folder: Path):
        def list_split() -> Listing:
            records, skipped = [], []
            for name in _subdirs(folder):
                if name not in index:
                    raise BuildError(
                        f"{folder / name}: unknown class {name!r} (no such folder in {roots['train']})"
                    )
                paths, bad = scan_images(folder / name, root, recursive=True)
                skipped += bad
                records += [file_record(p, root, index[name], name) for p in paths]
            skipped += loose_files(folder, root)
            require_images(records, skipped, folder, split)
            return finish(records, skipped)

        return list_split

    listers = {split: lister(split, folder) for split, folder in roots.items()}
    return Source(NAME, root, classes, listers, tuple(listers))
