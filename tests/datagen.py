"""Generated source datasets in the real layouts, with the awkward files real datasets contain.

Every generator writes a small tree (tens to hundreds of tiny images) and returns a `Truth`: what a
correct build must produce from it. Layouts: ILSVRC2012 extracted (standard, Kaggle, val as class folders,
val labels from LOC_val_solution.csv, the devkit or a labels file), ILSVRC2012 original archives (tar of
per-class tars, val tar, devkit tar.gz with a real meta.mat), Tiny-ImageNet-200, CIFAR-10 python batches,
and class folders. The awkward files (as found in real ImageNet): CMYK, grayscale and progressive JPEGs, a
PNG named .JPEG, a JPEG with bytes after its end marker, and files that must be skipped: truncated, empty,
and not an image at all.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Real ImageNet wnids (sorted), so class names come from the WordNet lemmas.
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
LEMMAS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus"}

# name -> (how to make it, expected outcome); outcome "keep" = stored byte-for-byte, "convert" = re-encoded
# RGB JPEG, anything else = the expected skip reason (a fragment of it).
AWKWARD = {
    "cmyk": "convert",
    "gray": "convert",
    "progressive": "keep",
    "pngasjpeg": "convert",
    "trailing": "keep",
    "truncated": "truncated",
    "empty": "empty file",
    "notimage": "not an image",
}


def jpeg(seed: int, size: tuple[int, int] = (40, 30), *, mode: str = "RGB", **save) -> bytes:
    """A small JPEG with random smooth content (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85, **save)
    return buf.getvalue()


def png(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def awkward(kind: str, seed: int) -> bytes:
    """The bytes of one awkward file."""
    if kind == "cmyk":
        return jpeg(seed, mode="CMYK")
    if kind == "gray":
        return jpeg(seed, mode="L")
    if kind == "progressive":
        return jpeg(seed, progressive=True)
    if kind == "pngasjpeg":
        return png(seed)
    if kind == "trailing":
        return jpeg(seed) + b"\0" * 100 + b"trailing bytes"
    if kind == "truncated":
        data = jpeg(seed, (64, 48))
        return data[: len(data) * 2 // 3]
    if kind == "empty":
        return b""
    if kind == "notimage":
        return b"<html>this is an error page, not an image</html>\n"
    raise ValueError(kind)


@dataclass
class Truth:
    """What a correct build of a generated tree gives.

    Attributes:
        classes: class ids in index order.
        samples: split -> {canonical source name: (class index or None, wnid or None)}.
        skipped: location (relative to SRC) -> expected reason fragment.
        kept: canonical source -> the original bytes, for files that must be stored unchanged.
        converted: canonical sources that must be re-encoded.
    """

    classes: list[str]
    samples: dict[str, dict[str, tuple[int | None, str | None]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    kept: dict[str, bytes] = field(default_factory=dict)
    converted: set[str] = field(default_factory=set)

    def add(
        self,
        split: str,
        source: str,
        label: int | None,
        wnid: str | None,
        data: bytes,
        kind: str = "ok",
        where: str | None = None,
    ) -> None:
        outcome = AWKWARD.get(kind, "keep")
        if outcome in ("keep", "convert"):
            self.samples.setdefault(split, {})[source] = (label, wnid)
            if outcome == "keep":
                self.kept[source] = data
            else:
                self.converted.add(source)
        else:
            self.skipped[where or source] = outcome


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---- ImageNet ---------------------------------------------------------------------------------------------


@dataclass
class ImageNetContent:
    """The files of a generated ILSVRC2012, independent of how they are laid out on disk."""

    wnids: list[str]
    train: dict[str, list[tuple[str, bytes, str]]]  # wnid -> [(file name, bytes, kind)]
    val: list[tuple[str, str, bytes, str]]  # [(file name, wnid, bytes, kind)] in image-number order


def imagenet_content(
    num_classes: int = 3,
    per_class: int = 6,
    val_images: int = 9,
    *,
    awkward_files: bool = True,
    seed: int = 0,
) -> ImageNetContent:
    rng = random.Random(seed)
    wnids = WNIDS[:num_classes]
    kinds = list(AWKWARD) if awkward_files else []
    train = {}
    n = 0
    for c, wnid in enumerate(wnids):
        files = []
        for i in range(per_class):
            k = i * len(wnids) + c  # spread the awkward files over the classes
            kind = kinds[k] if k < len(kinds) else "ok"
            data = awkward(kind, seed * 10_000 + n) if kind != "ok" else jpeg(seed * 10_000 + n)
            files.append((f"{wnid}_{1000 + i}.JPEG", data, kind))
            n += 1
        train[wnid] = files
    val = []
    for i in range(1, val_images + 1):
        kind = "cmyk" if awkward_files and i == 2 else "truncated" if awkward_files and i == 5 else "ok"
        data = awkward(kind, 90_000 + seed * 1000 + i) if kind != "ok" else jpeg(90_000 + seed * 1000 + i)
        val.append((f"ILSVRC2012_val_{i:08d}.JPEG", rng.choice(wnids), data, kind))
    return ImageNetContent(wnids, train, val)


def imagenet_truth(
    content: ImageNetContent, *, archives: bool = False, kaggle: bool = False, val_folders: bool = False
) -> Truth:
    truth = Truth(list(content.wnids))
    prefix = "ILSVRC/Data/CLS-LOC/" if kaggle else ""
    for c, wnid in enumerate(content.wnids):
        for name, data, kind in content.train[wnid]:
            where = (
                f"ILSVRC2012_img_train.tar/{wnid}.tar/{name}" if archives else f"{prefix}train/{wnid}/{name}"
            )
            truth.add("train", f"train/{wnid}/{name}", c, wnid, data, kind, where)
    for name, wnid, data, kind in content.val:
        if archives:
            where = f"ILSVRC2012_img_val.tar/{name}"
        else:
            where = f"{prefix}val/{wnid}/{name}" if val_folders else f"{prefix}val/{name}"
        truth.add("val", f"val/{name}", content.wnids.index(wnid), wnid, data, kind, where)
    return truth


def imagenet_tree(
    root: Path,
    content: ImageNetContent | None = None,
    *,
    val_labels: str = "csv",
    kaggle: bool = False,
    reverse: bool = False,
) -> Truth:
    """An extracted ILSVRC2012. `val_labels`: "csv" (LOC_val_solution.csv), "devkit" (extracted devkit
    folder), "devkit-tar", "file" (SRC/val_labels.txt, for --val-labels), "folders" (val/<wnid>/), "none".
    `reverse` creates files in reverse order (directory listing order then differs)."""
    content = content or imagenet_content()
    data_root = root / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else root
    files = [
        (data_root / "train" / w / name, data) for w in content.wnids for name, data, _ in content.train[w]
    ]
    for name, wnid, data, _ in content.val:
        files.append((data_root / "val" / (f"{wnid}/{name}" if val_labels == "folders" else name), data))
    for path, data in reversed(files) if reverse else files:
        _write(path, data)
    _val_label_files(root, content, val_labels)
    if kaggle:
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} name of {w}\n" for w in content.wnids))
    return imagenet_truth(content, kaggle=kaggle, val_folders=val_labels == "folders")


def imagenet_archives(
    root: Path, content: ImageNetContent | None = None, *, val_labels: str = "devkit-tar"
) -> Truth:
    """The original archives: ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar."""
    content = content or imagenet_content()
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in content.wnids:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as t:
                for name, data, _ in content.train[wnid]:
                    _add(t, name, data)
            _add(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w", format=tarfile.GNU_FORMAT) as t:
        for name, _, data, _ in content.val:
            _add(t, name, data)
    _val_label_files(root, content, val_labels)
    return imagenet_truth(content, archives=True)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1337000000
    tar.addfile(info, io.BytesIO(data))


def _val_label_files(root: Path, content: ImageNetContent, how: str) -> None:
    if how == "csv":
        rows = [f"{n[:-5]},{w} 1 2 30 40 {w} 3 4 20 20\n" for n, w, _, _ in reversed(content.val)]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))
    elif how == "file":
        (root / "val_labels.txt").write_text("".join(f"{w}\n" for _, w, _, _ in content.val))
    elif how in ("devkit", "devkit-tar"):
        meta, truth_txt = devkit_files(content)
        if how == "devkit":
            _write(root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat", meta)
            _write(
                root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt", truth_txt
            )
        else:
            with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
                _add(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta)
                _add(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth_txt)


def devkit_files(content: ImageNetContent) -> tuple[bytes, bytes]:
    """meta.mat (a real MATLAB struct array, as scipy writes it) and the val ground truth (ILSVRC2012_IDs).

    IDs are assigned in reverse wnid order, as in the real devkit (ID 1 is not the first sorted wnid), plus
    one non-leaf synset, so a reader that ignored the table would get the labels wrong.
    """
    import scipy.io

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    ids = {w: len(content.wnids) - i for i, w in enumerate(content.wnids)}
    rows = [
        (ids[w], w, LEMMAS.get(w, f"devkit name of {w}"), "a gloss", 0, np.zeros(0), 0, 6)
        for w in content.wnids
    ]
    rows.append((len(rows) + 1, "n00001740", "entity", "the root", 2, np.array([1.0, 2.0]), 10, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    truth = "".join(f"{ids[w]}\n" for _, w, _, _ in content.val)
    return buf.getvalue(), truth.encode()


# ---- Tiny-ImageNet-200 ----------------------------------------------------------------------------------


def tiny_imagenet(
    root: Path,
    *,
    num_classes: int = 3,
    per_class: int = 5,
    val_images: int = 6,
    test_images: int = 3,
    awkward_files: bool = True,
) -> Truth:
    wnids = WNIDS[:num_classes]
    truth = Truth(sorted(wnids))
    (root).mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text(
        "".join(f"{w}\n" for w in reversed(wnids))
    )  # not sorted, as in the real file
    words = [f"{w}\t{LEMMAS.get(w, 'tiny name of ' + w)}\n" for w in [*wnids, "n99999999"]]
    (root / "words.txt").write_text("".join(words))
    kinds = [k for k in AWKWARD if awkward_files]
    n = 0
    for c, wnid in enumerate(sorted(wnids)):
        boxes = []
        for i in range(per_class):
            kind = kinds.pop() if kinds and i < 3 else "ok"
            data = awkward(kind, 500 + n) if kind != "ok" else jpeg(500 + n, (64, 64))
            name = f"{wnid}_{i}.JPEG"
            _write(root / "train" / wnid / "images" / name, data)
            truth.add("train", f"train/{wnid}/images/{name}", c, wnid, data, kind)
            boxes.append(f"{name}\t0\t0\t10\t10\n")
            n += 1
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    annotations = []
    for i in range(val_images):
        wnid = sorted(wnids)[i % num_classes]
        kind = "gray" if awkward_files and i == 1 else "ok"
        data = awkward(kind, 700 + i) if kind != "ok" else jpeg(700 + i, (64, 64))
        _write(root / "val" / "images" / f"val_{i}.JPEG", data)
        annotations.append(f"val_{i}.JPEG\t{wnid}\t1\t2\t30\t40\n")
        truth.add("val", f"val/images/val_{i}.JPEG", sorted(wnids).index(wnid), wnid, data, kind)
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    for i in range(test_images):
        data = jpeg(800 + i, (64, 64))
        _write(root / "test" / "images" / f"test_{i}.JPEG", data)
        truth.add("test", f"test/images/test_{i}.JPEG", None, None, data)
    return truth


# ---- CIFAR-10 -----------------------------------------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10(root: Path, *, per_batch: int = 8, test: int = 10, inside: bool = True) -> tuple[Truth, dict]:
    """Python batches with random pixels; also returns {source: (32, 32, 3) uint8 pixels} for exact checks."""
    folder = root / "cifar-10-batches-py" if inside else root
    folder.mkdir(parents=True, exist_ok=True)
    truth = Truth(list(CIFAR_NAMES))
    pixels = {}
    rng = np.random.default_rng(0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}, f)
    rel = "cifar-10-batches-py/" if inside else ""
    for name, count, split in [
        *((f"data_batch_{i}", per_batch, "train") for i in range(1, 6)),
        ("test_batch", test, "val"),
    ]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, count)]
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"batch_label": name.encode(),
                    b"labels": labels,
                    b"data": data,
                    b"filenames": [f"img_{i}.png".encode() for i in range(count)],
                },
                f,
            )
        for i in range(count):
            source = f"{rel}{name}/{i:05d}"
            truth.samples.setdefault(split, {})[source] = (labels[i], CIFAR_NAMES[labels[i]])
            pixels[source] = data[i].reshape(3, 32, 32).transpose(1, 2, 0)
    return truth, pixels


# ---- class folders --------------------------------------------------------------------------------------------


def folder(root: Path, *, classes: tuple[str, ...] = ("cat", "dog", "emu"), per_class: int = 4) -> Truth:
    """Class folders with a nested folder, the same file name in every class (keys must still be unique), a PNG
    (kept as PNG), an RGBA PNG (converted), a README (skipped) and a hidden file (ignored)."""
    truth = Truth(sorted(classes))
    for c, name in enumerate(sorted(classes)):
        for i in range(per_class):
            sub = "nested/" if i == 3 else ""
            data = jpeg(1000 + c * 10 + i)
            _write(root / name / f"{sub}{i:03d}.jpg", data)
            truth.add("train", f"{name}/{sub}{i:03d}.jpg", c, name, data)
    data = png(2000)
    _write(root / "cat" / "photo.png", data)
    truth.add("train", "cat/photo.png", 0, "cat", data)
    _write(root / "dog" / "alpha.png", png(2001, mode="RGBA"))
    truth.samples["train"]["dog/alpha.png"] = (1, "dog")
    truth.converted.add("dog/alpha.png")  # RGBA: made RGB, stays PNG
    _write(root / "dog" / "README.txt", b"notes")
    truth.skipped["dog/README.txt"] = "not an image file name"
    _write(root / "emu" / ".DS_Store", b"\0\0")
    return truth


def shuffled_listing(monkeypatch, seed: int = 1) -> None:
    """Make os.scandir return entries in a random order, as another filesystem might."""
    real = os.scandir

    class Shuffled:
        def __init__(self, path):
            self._it = real(path)
            entries = list(self._it)
            random.Random(f"{seed}/{path}").shuffle(entries)
            self._entries = iter(entries)

        def __iter__(self):
            return self

        def __next__(self):
            return next(self._entries)

        def close(self):
            self._it.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._it.close()

    monkeypatch.setattr(os, "scandir", Shuffled)


# ---- reading a build back -----------------------------------------------------------------------------------


def read_split(manifest, split: str) -> list[dict]:
    """Every sample of a split, read with stock webdataset.WebDataset and cross-checked against tarfile."""
    import webdataset as wds

    base = manifest.base_dir
    urls = [str(base / s.name) for s in manifest.split(split).shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    by_tarfile = []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if not by_tarfile or by_tarfile[-1]["__key__"] != key:
                    by_tarfile.append({"__key__": key})
                by_tarfile[-1][ext] = tar.extractfile(member).read()
    assert [
        {k: v for k, v in s.items() if k != "__url__" and k != "__local_path__"} for s in samples
    ] == by_tarfile
    return samples


def check_build(manifest, truth: Truth) -> dict[str, list[dict]]:
    """Assert that a build's shards hold exactly what `truth` says; returns the samples by split."""
    import json

    assert [c.id for c in manifest.classes] == truth.classes
    out = {}
    for split, expected in truth.samples.items():
        samples = read_split(manifest, split)
        out[split] = samples
        shards = manifest.split(split).shards
        assert manifest.split(split).num_samples == len(samples) == len(expected), split
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
        seen = {}
        for s in samples:
            meta = json.loads(s["json"])
            source = meta["source"]
            label, wnid = expected[source]
            assert meta.get("wnid") == wnid
            if label is None:
                assert "cls" not in s
            else:
                assert int(s["cls"]) == label
            ext = "jpg" if "jpg" in s else "png"
            image = Image.open(io.BytesIO(s[ext]))
            image.load()
            assert image.mode == "RGB" and image.size == (meta["width"], meta["height"])
            if source in truth.kept:
                assert s[ext] == truth.kept[source], f"{source} was not stored byte-for-byte"
            if source in truth.converted:
                assert s[ext] != truth.kept.get(source)
            seen[source] = True
        assert set(seen) == set(expected)
        for shard in shards:
            with tarfile.open(manifest.base_dir / shard.name) as tar:
                assert len({m.name.split(".")[0] for m in tar}) == shard.num_samples
    skipped = {s["path"]: s["reason"] for s in manifest.skipped}
    assert set(skipped) == set(truth.skipped), (skipped, truth.skipped)
    for path, fragment in truth.skipped.items():
        assert fragment in skipped[path], (path, skipped[path])
    return out
