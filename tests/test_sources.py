"""Layout detection and listing: what each layout finds, and how it names, labels and orders it."""

from __future__ import annotations

import tarfile

import pytest

from shardtool.errors import BuildError, LayoutError
from shardtool.sources import SourceOptions, detect, open_source
from tests import datagen


def labels(source, split):
    return {r.source: (r.label, r.wnid) for r in source.listing(split).records}


def test_each_layout_is_detected(tmp_path):
    datagen.imagenet_tree(tmp_path / "tree")
    datagen.imagenet_tree(tmp_path / "kaggle", kaggle=True)
    datagen.imagenet_archives(tmp_path / "tars")
    datagen.tiny_imagenet(tmp_path / "tiny")
    datagen.cifar10(tmp_path / "cifar", per_batch=1, test=1)
    datagen.cifar10(tmp_path / "cifar-flat", per_batch=1, test=1, inside=False)
    datagen.folder(tmp_path / "folders")
    expected = {
        "tree": "imagenet",
        "kaggle": "imagenet",
        "tars": "imagenet-archives",
        "tiny": "tiny-imagenet",
        "cifar": "cifar10",
        "cifar-flat": "cifar10",
        "folders": "folder",
    }
    assert {name: detect(tmp_path / name) for name in expected} == expected


def test_val_labels_agree_whatever_their_source(tmp_path):
    content = datagen.imagenet_content()
    truth = datagen.imagenet_truth(content)
    for how in ("csv", "devkit", "devkit-tar", "file", "folders"):
        root = tmp_path / how
        datagen.imagenet_tree(root, content, val_labels=how)
        options = SourceOptions(val_labels=root / "val_labels.txt" if how == "file" else None)
        found = labels(open_source(root, options=options), "val")
        expected = {k: v for k, v in truth.samples["val"].items()}
        expected["val/ILSVRC2012_val_00000005.JPEG"] = found[
            "val/ILSVRC2012_val_00000005.JPEG"
        ]  # listed; skipped later
        assert found == expected, how


def test_devkit_ids_are_mapped_through_meta_mat(tmp_path):
    """The ground truth holds ILSVRC2012_IDs, which are not sorted-wnid indices."""
    content = datagen.imagenet_content(awkward_files=False)
    datagen.imagenet_tree(tmp_path, content, val_labels="devkit")
    found = labels(open_source(tmp_path), "val")
    assert [found[f"val/{name}"][1] for name, *_ in content.val] == [wnid for _, wnid, *_ in content.val]


def test_archive_members_are_read_in_place(tmp_path):
    content = datagen.imagenet_content(awkward_files=False)
    datagen.imagenet_archives(tmp_path, content)
    source = open_source(tmp_path)
    records = source.listing("train").records
    by_source = {r.source: r for r in records}
    for wnid, files in content.train.items():
        for name, data, _ in files:
            record = by_source[f"train/{wnid}/{name}"]
            assert record.data.read() == data
            assert record.location == f"ILSVRC2012_img_train.tar/{wnid}.tar/{name}"


def test_a_truncated_train_archive_is_a_layout_error(tmp_path):
    datagen.imagenet_archives(tmp_path, datagen.imagenet_content(awkward_files=False))
    path = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])
    with pytest.raises(LayoutError, match=r"ILSVRC2012_img_train\.tar"):
        open_source(tmp_path).listing("train")


def test_listing_is_sorted_and_keys_are_unique(tmp_path, monkeypatch):
    datagen.folder(tmp_path / "src")
    (tmp_path / "src" / "emu" / "x.y.z.jpg").write_bytes(datagen.jpeg(1))
    datagen.shuffled_listing(monkeypatch)
    records = open_source(tmp_path / "src").listing("train").records
    assert [r.source for r in records] == sorted(r.source for r in records)
    keys = [r.key for r in records]
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys)
    assert {r.source: r.key for r in records}["emu/x.y.z.jpg"] == "x_y_z"
    assert {r.source: r.key for r in records}["cat/000.jpg"] == "cat_000"  # 000.jpg is in every class


def test_class_folders_with_split_folders(tmp_path):
    for split in ("train", "val"):
        datagen.folder(tmp_path / split)
    source = open_source(tmp_path)
    assert source.layout == "folder" and source.default_splits == ("train", "val")
    assert labels(source, "val")["val/dog/001.jpg"] == (1, "dog")
    (tmp_path / "val" / "yak").mkdir()
    (tmp_path / "val" / "yak" / "1.jpg").write_bytes(datagen.jpeg(3))
    with pytest.raises(BuildError, match="unknown class 'yak'"):
        source.listing("val")


def test_class_names(tmp_path):
    datagen.imagenet_tree(tmp_path / "tree")
    names = [c.name for c in open_source(tmp_path / "tree").classes]
    assert names[:2] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    datagen.cifar10(tmp_path / "cifar", per_batch=1, test=1)
    assert [c.id for c in open_source(tmp_path / "cifar").classes] == datagen.CIFAR_NAMES


def test_forcing_a_layout_that_does_not_fit(tmp_path):
    datagen.imagenet_tree(tmp_path)
    with pytest.raises(LayoutError, match=r"missing wnids\.txt"):
        open_source(tmp_path, "tiny-imagenet")
    with pytest.raises(LayoutError, match="unknown layout 'coco'"):
        open_source(tmp_path, "coco")
