"""ILSVRC2012 (ImageNet-1k): the extracted tree and the original archives, read in place.

Two layouts share this module:

- `imagenet` (`tree`): `train/<wnid>/*.JPEG` and `val/`, either at SRC or in Kaggle's
  `ILSVRC/Data/CLS-LOC/`. `val/` holds class folders or flat `ILSVRC2012_val_XXXXXXXX.JPEG` files.
- `imagenet-archives` (`archives`): `ILSVRC2012_img_train.tar` (a tar of 1000 per-class tars) and
  `ILSVRC2012_img_val.tar`. Extracting 1.28 M files is the slowest step of the usual recipe, so we never
  do it: listing reads only tar headers, and each sample is read with one `pread` at its offset.

Flat val images take their labels from (first found): `--val-labels FILE` (one wnid per line in image
order), `LOC_val_solution.csv` (Kaggle), or the devkit (`ILSVRC2012_devkit_t12.tar.gz` or its extracted
folder: `data/ILSVRC2012_validation_ground_truth.txt` holds ILSVRC2012_IDs that `data/meta.mat` maps to
wnids). Class names come from `LOC_synset_mapping.txt`, the devkit, or the WordNet lemmas shipped with
timm, in that order. Both layouts give records the same canonical source names (`train/<wnid>/<file>`,
`val/<file>`), so building either gives identical shards.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import logging
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from ..errors import BuildError, LayoutError
from ..manifest import ClassInfo
from .records import Listing, MemberData, Record, Source, SourceOptions
from .scan import file_record, finish, key_for, loose_files, rel, require_images, scan_images, subdirs

log = logging.getLogger(__name__)

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
KAGGLE_DATA = Path("ILSVRC", "Data", "CLS-LOC")
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")
WNID = re.compile(r"n\d{8}")


# ---- class names ------------------------------------------------------------------------------------


@functools.cache
def wordnet_lemmas() -> dict[str, str]:
    """wnid -> lemmas ("tench, Tinca tinca") from timm's data files (21k synsets), or {} without timm.

    Found without importing timm, which would import torch.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations)), "data", "_info", "imagenet_synset_to_lemma.txt")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def read_synset_mapping(path: Path) -> dict[str, str]:
    """`LOC_synset_mapping.txt`: "n01440764 tench, Tinca tinca" per line."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            out[wnid] = name.strip()
    return out


def class_infos(wnids: list[str], root: Path) -> list[ClassInfo]:
    """ClassInfo per wnid (already in index order), named from the best source available."""
    names = dict(wordnet_lemmas())
    devkit = _Devkit.find(root)
    if devkit is not None:
        names.update(devkit.names())
    mapping = root / SYNSET_MAPPING
    if mapping.is_file():
        names.update(read_synset_mapping(mapping))
    return [ClassInfo(w, names.get(w, w)) for w in wnids]


# ---- val labels ---------------------------------------------------------------------------------------


class _Devkit:
    """The ILSVRC2012 devkit, as the original tar.gz or extracted: val ground truth and the synset table."""

    def __init__(self, origin: Path, read: Callable[[str], bytes]):
        self.origin = origin
        self._read = read

    @classmethod
    def find(cls, root: Path) -> _Devkit | None:
        folder = root / DEVKIT_DIR
        if (folder / "data" / "meta.mat").is_file():
            return cls(folder, lambda name: (folder / name).read_bytes())
        archive = root / DEVKIT_TAR
        if archive.is_file():

            def read(name: str) -> bytes:
                try:
                    with tarfile.open(archive, "r:gz") as tar:
                        member = tar.extractfile(f"{DEVKIT_DIR}/{name}")
                        return member.read() if member else b""
                except (KeyError, tarfile.TarError, OSError, EOFError) as e:
                    raise LayoutError(f"{archive}: cannot read {DEVKIT_DIR}/{name} ({e})") from None

            return cls(archive, read)
        return None

    @functools.cached_property
    def _synsets(self) -> list[tuple[int, str, str]]:
        """(ILSVRC2012_ID, wnid, words) of the 1000 leaf synsets, from data/meta.mat."""
        import scipy.io

        try:
            meta = scipy.io.loadmat(io.BytesIO(self._read("data/meta.mat")), squeeze_me=True)["synsets"]
            return [
                (int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]))
                for s in meta
                if int(s["num_children"]) == 0
            ]
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise LayoutError(
                f"{self.origin}: data/meta.mat is not the ILSVRC2012 synset table ({e})"
            ) from None

    def names(self) -> dict[str, str]:
        return {wnid: words for _, wnid, words in self._synsets}

    def val_wnids(self) -> list[str]:
        """The wnid of val image i+1 at position i."""
        by_id = {i: wnid for i, wnid, _ in self._synsets}
        name = "data/ILSVRC2012_validation_ground_truth.txt"
        out = []
        for n, line in enumerate(self._read(name).decode().split(), 1):
            try:
                out.append(by_id[int(line)])
            except (KeyError, ValueError):
                raise BuildError(
                    f"{self.origin}: {name} line {n}: {line!r} is not an ILSVRC2012_ID"
                ) from None
        return out


def val_labeler(root: Path, options: SourceOptions) -> tuple[str, Callable[[str, int], str | None]]:
    """Where flat val labels come from, and `label(stem, position) -> wnid or None`.

    `position` is the image's index in sorted name order, used for files not named ILSVRC2012_val_N.
    """
    if options.val_labels is not None:
        path = options.val_labels
        try:
            wnids = path.read_text(encoding="utf-8").split()
        except OSError as e:
            raise BuildError(f"{path}: cannot read val labels ({e.strerror})") from None
        return str(path), _by_position(wnids)
    csv_path = root / KAGGLE_VAL_SOLUTION
    if csv_path.is_file():
        return str(csv_path), _kaggle_solution(csv_path).get
    devkit = _Devkit.find(root)
    if devkit is not None:
        return f"{devkit.origin} (ground truth)", _by_position(devkit.val_wnids())
    raise BuildError(
        f"{root}: val images are not in class folders and no labels were found: put {KAGGLE_VAL_SOLUTION} "
        f"or {DEVKIT_TAR} in {root}, or pass --val-labels FILE (one wnid per line, in image order)"
    )


def _by_position(wnids: list[str]) -> Callable[[str, int], str | None]:
    def label(stem: str, position: int) -> str | None:
        m = _VAL_NUMBER.fullmatch(stem)
        i = int(m.group(1)) - 1 if m else position
        return wnids[i] if 0 <= i < len(wnids) else None

    return label


def _kaggle_solution(path: Path) -> dict[str, str]:
    """`LOC_val_solution.csv`: ImageId -> the first wnid of its PredictionString."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if n == 1 and row and row[0] == "ImageId":
                continue
            if len(row) < 2 or not row[1].split():
                raise BuildError(f"{path} line {n}: expected ImageId,PredictionString")
            out[row[0]] = row[1].split()[0]
    return out


def label_val(
    names: list[tuple[str, str]], classes: dict[str, int], root: Path, options: SourceOptions
) -> list[tuple[str, int]]:
    """Labels for flat val files given as sorted (file name, display path): (wnid, class index) each."""
    origin, label = val_labeler(root, options)
    out = []
    for position, (name, where) in enumerate(names):
        wnid = label(os.path.splitext(name)[0], position)
        if wnid is None:
            raise BuildError(f"{origin}: no label for {where}")
        if wnid not in classes:
            raise BuildError(f"{origin}: unknown wnid {wnid!r} for {where} (not one of the train classes)")
        out.append((wnid, classes[wnid]))
    return out


# ---- the extracted tree -------------------------------------------------------------------------------


def _data_root(root: Path) -> Path | None:
    """The folder holding train/ and val/: SRC itself or Kaggle's ILSVRC/Data/CLS-LOC inside it."""
    for candidate in (root, root / KAGGLE_DATA):
        train, val = candidate / "train", candidate / "val"
        if _has(train, lambda e: e.is_dir() and WNID.fullmatch(e.name)) or _has(
            val, lambda e: _VAL_NUMBER.match(e.name) or (e.is_dir() and WNID.fullmatch(e.name))
        ):
            return candidate
    return None


def _has(folder: Path, predicate) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(predicate(e) for e in it)
    except OSError:
        return False


def _open_tree(root: Path, options: SourceOptions) -> Source:
    data = _data_root(root)
    if data is None:
        raise LayoutError(
            f"{root}: not an ILSVRC2012 tree (expected train/<wnid>/*.JPEG or val/ here or in {KAGGLE_DATA})"
        )
    train, val = data / "train", data / "val"
    if train.is_dir():
        wnids = subdirs(train)
    elif val.is_dir() and subdirs(val):
        wnids = subdirs(val)
    else:
        wnids = sorted({w for w in _val_wnids_from_labels(root, val, options)})
    classes = class_infos(wnids, root)
    index = {c.id: i for i, c in enumerate(classes)}

    def list_train() -> Listing:
        records, skipped = [], []
        for wnid in wnids:
            paths, bad = scan_images(train / wnid, root)
            skipped += bad
            records += [
                file_record(p, root, index[wnid], wnid, source=f"train/{wnid}/{p.name}") for p in paths
            ]
        skipped += loose_files(train, root)
        require_images(records, skipped, train, "train")
        return finish(records, skipped)

    def list_val() -> Listing:
        records, skipped = [], []
        folders = subdirs(val)
        if folders:
            for wnid in folders:
                if wnid not in index:
                    raise BuildError(f"{val / wnid}: unknown wnid {wnid!r} (no such class in {train})")
                paths, bad = scan_images(val / wnid, root)
                skipped += bad
                records += [file_record(p, root, index[wnid], wnid, source=f"val/{p.name}") for p in paths]
            skipped += loose_files(val, root)
        else:
            paths, skipped = scan_images(val, root)
            paths.sort(key=lambda p: p.name)
            labels = label_val([(p.name, rel(p.path, root)) for p in paths], index, root, options)
            records = [
                file_record(p, root, i, wnid, source=f"val/{p.name}") for p, (wnid, i) in zip(paths, labels)
            ]
        require_images(records, skipped, val, "val")
        return finish(records, skipped)

    listers = {}
    if train.is_dir():
        listers["train"] = list_train
    if val.is_dir():
        listers["val"] = list_val
    return Source("imagenet", root, classes, listers, tuple(listers))


def _val_wnids_from_labels(root: Path, val: Path, options: SourceOptions) -> list[str]:
    """With no train split, the classes are the wnids the val labels use."""
    paths, _ = scan_images(val, root)
    _, label = val_labeler(root, options)
    names = sorted(p.name for p in paths)
    return [w for i, n in enumerate(names) if (w := label(os.path.splitext(n)[0], i))]


# ---- the original archives ----------------------------------------------------------------------------


_SPECIAL = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a device",
    tarfile.BLKTYPE: "a device",
    tarfile.FIFOTYPE: "a fifo",
}


def _members(
    f, start: int = 0, end: int | None = None, where: str = "", special: list[tuple[str, str]] | None = None
) -> list[tarfile.TarInfo]:
    """Regular-file members of the tar that starts at offset `start` of open file `f`, headers only.

    tarfile's offsets are positions in `f`. A member reaching past `end` (the enclosing member's end)
    means a truncated archive. Links, devices and fifos are never read; with `special` given, each is
    listed there as (file name, what it is), for the caller to report as skipped.
    """
    f.seek(start)
    out = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # leaves `f` open
            for m in tar:
                if end is not None and m.offset >= end:
                    break
                if end is not None and m.offset_data + m.size > end:
                    raise LayoutError(f"{where}: truncated (member {m.name} runs past the end)")
                if m.isfile():
                    out.append(m)
                elif special is not None and m.type in _SPECIAL:
                    special.append((os.path.basename(m.name), _SPECIAL[m.type]))
        return out
    except tarfile.TarError as e:
        raise LayoutError(f"{where}: not a readable tar archive ({e})") from None


def _not_regular(where: str, special: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"path": f"{where}/{name}", "reason": f"not a regular file ({kind})"} for name, kind in special]


def _open_archives(root: Path, options: SourceOptions) -> Source:
    train_tar, val_tar = root / TRAIN_TAR, root / VAL_TAR
    class_tars: list[tarfile.TarInfo] = []
    if train_tar.is_file():
        with open(train_tar, "rb") as f:
            class_tars = sorted(_members(f, where=str(train_tar)), key=lambda m: m.name)
        bad = [
            m.name for m in class_tars if not WNID.fullmatch(Path(m.name).stem) or not m.name.endswith(".tar")
        ]
        if bad:
            raise LayoutError(f"{train_tar}: expected one <wnid>.tar per class, found {bad[0]!r}")
        wnids = [Path(m.name).stem for m in class_tars]
    elif val_tar.is_file():
        wnids = sorted(set(_archive_val_labels(root, val_tar, options, None)))
    else:
        raise LayoutError(f"{root}: neither {TRAIN_TAR} nor {VAL_TAR} is here")
    classes = class_infos(wnids, root)
    index = {c.id: i for i, c in enumerate(classes)}

    def list_train() -> Listing:
        records, skipped = [], []
        with open(train_tar, "rb") as f:
            for class_tar in class_tars:
                wnid = Path(class_tar.name).stem
                inner_where = f"{TRAIN_TAR}/{class_tar.name}"
                end = class_tar.offset_data + class_tar.size
                special: list[tuple[str, str]] = []
                members = _members(f, class_tar.offset_data, end, f"{train_tar}/{class_tar.name}", special)
                skipped += _not_regular(inner_where, special)
                for m in members:
                    name = os.path.basename(m.name)
                    where = f"{inner_where}/{name}"
                    if not name.lower().endswith((".jpeg", ".jpg")):
                        skipped.append({"path": where, "reason": "not an image file name"})
                        continue
                    data = MemberData(str(train_tar), m.offset_data, m.size)
                    records.append(
                        Record(key_for(name), f"train/{wnid}/{name}", index[wnid], wnid, data, where)
                    )
        require_images(records, skipped, train_tar, "train")
        return finish(records, skipped)

    def list_val() -> Listing:
        special: list[tuple[str, str]] = []
        with open(val_tar, "rb") as f:
            members = sorted(
                _members(f, where=str(val_tar), special=special), key=lambda m: os.path.basename(m.name)
            )
        names = [os.path.basename(m.name) for m in members]
        labels = _archive_val_labels(root, val_tar, options, index, members)
        records = [
            Record(
                key_for(n),
                f"val/{n}",
                i,
                wnid,
                MemberData(str(val_tar), m.offset_data, m.size),
                f"{VAL_TAR}/{n}",
            )
            for n, m, (wnid, i) in zip(names, members, labels)
        ]
        skipped = _not_regular(VAL_TAR, special)
        require_images(records, skipped, val_tar, "val")
        return finish(records, skipped)

    listers = {}
    if class_tars:
        listers["train"] = list_train
    if val_tar.is_file():
        listers["val"] = list_val
    return Source("imagenet-archives", root, classes, listers, tuple(listers))


def _archive_val_labels(root, val_tar, options, index, members=None):
    """Labels of the val archive's members; with `index` None, just the wnids (to find the classes)."""
    if members is None:
        with open(val_tar, "rb") as f:
            members = sorted(_members(f, where=str(val_tar)), key=lambda m: os.path.basename(m.name))
    names = [(os.path.basename(m.name), f"{VAL_TAR}/{os.path.basename(m.name)}") for m in members]
    if index is None:
        _, label = val_labeler(root, options)
        return [w for i, (n, _) in enumerate(names) if (w := label(os.path.splitext(n)[0], i))]
    return label_val(names, index, root, options)


tree = SimpleNamespace(
    detect=lambda root: _data_root(root) is not None,
    open_source=_open_tree,
)
archives = SimpleNamespace(
    detect=lambda root: (root / TRAIN_TAR).is_file() or (root / VAL_TAR).is_file(),
    open_source=_open_archives,
)
