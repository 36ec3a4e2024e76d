"""Tiny-ImageNet-200 (Stanford CS231n): 200 classes of 64x64 images.

    wnids.txt                          the 200 class wnids (class index = position in sorted order)
    words.txt                          "wnid<TAB>names" for all WordNet synsets
    train/<wnid>/images/*.JPEG         500 per class (train/<wnid>/<wnid>_boxes.txt is ignored)
    val/images/val_N.JPEG              labelled by val/val_annotations.txt ("file<TAB>wnid<TAB>box...")
    test/images/test_N.JPEG            no labels: built only with `--split test`, without `.cls`

`ImageFolder` on `val/` sees a single class; the annotations file is the only source of val labels.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BuildError, LayoutError
from ..manifest import ClassInfo
from .records import Listing, Source, SourceOptions
from .scan import file_record, finish, rel, require_images, scan_images, subdirs

NAME = "tiny-imagenet"
ANNOTATIONS = Path("val", "val_annotations.txt")


def detect(root: Path) -> bool:
    return (root / "wnids.txt").is_file() and (root / "train").is_dir()


def read_words(path: Path, wanted: set[str]) -> dict[str, str]:
    """`words.txt` ("wnid<TAB>names" lines), restricted to the wanted wnids."""
    out = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            wnid, _, names = line.partition("\t")
            if wnid in wanted:
                out[wnid] = names.strip()
    return out


def open_source(root: Path, options: SourceOptions) -> Source:
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise LayoutError(f"{root}: not Tiny-ImageNet-200 (missing wnids.txt)")
    wnids = sorted(set(wnids_file.read_text(encoding="utf-8").split()))
    if not wnids:
        raise LayoutError(f"{wnids_file}: lists no classes")
    names = read_words(root / "words.txt", set(wnids))
    classes = [ClassInfo(w, names.get(w, w)) for w in wnids]
    index = {w: i for i, w in enumerate(wnids)}
    train = root / "train"

    def list_train() -> Listing:
        records, skipped = [], []
        for wnid in subdirs(train):
            if wnid not in index:
                raise BuildError(f"{train / wnid}: unknown wnid {wnid!r} (not in {wnids_file})")
            images = train / wnid / "images"
            paths, bad = scan_images(images, root) if images.is_dir() else ([], [])
            skipped += bad
            records += [file_record(p, root, index[wnid], wnid) for p in paths]
        require_images(records, skipped, train, "train")
        return finish(records, skipped)

    def list_val() -> Listing:
        labels = _annotations(root / ANNOTATIONS, index)
        paths, skipped = scan_images(root / "val" / "images", root)
        records = []
        for p in paths:
            wnid = labels.get(p.name)
            if wnid is None:
                raise BuildError(f"{root / ANNOTATIONS}: no label for {rel(p.path, root)}")
            records.append(file_record(p, root, index[wnid], wnid))
        require_images(records, skipped, root / "val" / "images", "val")
        return finish(records, skipped)

    def list_test() -> Listing:
        paths, skipped = scan_images(root / "test" / "images", root)
        records = [file_record(p, root, None, None) for p in paths]
        require_images(records, skipped, root / "test" / "images", "test")
        return finish(records, skipped)

    listers = {"train": list_train}
    if (root / "val").is_dir():
        listers["val"] = list_val
    if (root / "test" / "images").is_dir():
        listers["test"] = list_test
    default = tuple(s for s in ("train", "val") if s in listers)
    return Source(NAME, root, classes, listers, default, unlabeled=frozenset({"test"}))


def _annotations(path: Path, index: dict[str, int]) -> dict[str, str]:
    """file name -> wnid from val_annotations.txt; a missing file or an unknown wnid is a user error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BuildError(f"{path}: missing (it holds the val labels)") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise BuildError(f"{path} line {n}: expected 'file<TAB>wnid<TAB>...'")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise BuildError(f"{path} line {n}: unknown wnid {wnid!r} (not in wnids.txt)")
        out[name] = wnid
    return out
