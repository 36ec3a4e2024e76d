"""shardtool build: every layout from generated trees, read back with webdataset and tarfile.

Builds run in-process (the same code the CLI calls) except where the command line itself is the subject
(test_build_cli.py: errors, interruption, workers).
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from shardtool.build import BuildOptions, build, parse_size
from shardtool.errors import BuildError
from shardtool.images import ImageOptions
from shardtool.manifest import load
from shardtool.sources import SourceOptions
from tests import datagen

SMALL = dict(shard_size=6_000, workers=0)  # a few samples per shard, no worker processes


def run(src, out, **kw):
    options = BuildOptions(**{**SMALL, **kw})
    report = build(src, out, options, progress=False)
    return load(out / "manifest.json"), report


@pytest.mark.parametrize("val_labels", ["csv", "devkit", "devkit-tar", "file", "folders"])
def test_imagenet_tree(tmp_path, val_labels):
    truth = datagen.imagenet_tree(tmp_path / "src", val_labels=val_labels)
    source = SourceOptions(val_labels=tmp_path / "src" / "val_labels.txt" if val_labels == "file" else None)
    manifest, report = run(tmp_path / "src", tmp_path / "out", source=source)
    assert manifest.layout == "imagenet"
    datagen.check_build(manifest, truth)
    assert manifest.classes[0].name == "tench, Tinca tinca"  # WordNet lemmas shipped with timm
    train = next(r for r in report.splits if r.name == "train")
    assert train.skipped == 3 and train.converted == 3  # truncated/empty/not-image; CMYK/gray/PNG


def test_kaggle_layout_uses_synset_mapping(tmp_path):
    truth = datagen.imagenet_tree(tmp_path / "src", kaggle=True)
    manifest, _ = run(tmp_path / "src", tmp_path / "out")
    datagen.check_build(manifest, truth)
    assert manifest.classes[1].name == "name of n01443537"  # LOC_synset_mapping.txt wins


def test_archives_read_in_place_give_the_same_shards_as_the_tree(tmp_path):
    content = datagen.imagenet_content()
    truth = datagen.imagenet_archives(tmp_path / "tars", content)
    manifest, _ = run(tmp_path / "tars", tmp_path / "out-tars", workers=2)
    assert manifest.layout == "imagenet-archives"
    datagen.check_build(manifest, truth)
    assert manifest.classes[2].name == "devkit name of n01484850"
    assert not any(p.name.endswith(".JPEG") for p in (tmp_path / "tars").rglob("*"))  # nothing extracted

    datagen.imagenet_tree(tmp_path / "tree", content, val_labels="devkit-tar")
    tree, _ = run(tmp_path / "tree", tmp_path / "out-tree")
    assert [s.sha256 for _, s in tree.shards()] == [s.sha256 for _, s in manifest.shards()]


def test_tiny_imagenet_and_its_unlabeled_test_split(tmp_path):
    truth = datagen.tiny_imagenet(tmp_path / "src")
    manifest, _ = run(tmp_path / "src", tmp_path / "out", splits=("train", "val", "test"))
    samples = datagen.check_build(manifest, truth)
    assert manifest.split("test").labeled is False and manifest.split("train").labeled
    assert all("cls" not in s for s in samples["test"])
    assert manifest.classes[0].name == "tench, Tinca tinca"  # from words.txt
    default, _ = run(tmp_path / "src", tmp_path / "out2")
    assert list(default.splits) == ["train", "val"]  # test only when asked


def test_cifar10_is_stored_losslessly_as_png(tmp_path):
    truth, pixels = datagen.cifar10(tmp_path / "src")
    manifest, _ = run(tmp_path / "src", tmp_path / "out")
    samples = datagen.check_build(manifest, truth)
    assert [c.id for c in manifest.classes][:2] == ["airplane", "automobile"]
    for s in samples["train"] + samples["val"]:
        source = json.loads(s["json"])["source"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), pixels[source])


def test_class_folders(tmp_path):
    truth = datagen.folder(tmp_path / "src")
    manifest, _ = run(tmp_path / "src", tmp_path / "out")
    samples = datagen.check_build(manifest, truth)
    assert manifest.layout == "folder" and manifest.dataset == "src"
    by_source = {json.loads(s["json"])["source"]: s for s in samples["train"]}
    assert "png" in by_source["cat/photo.png"] and "png" in by_source["dog/alpha.png"]


def test_shards_mix_classes_and_respect_size_limits(tmp_path):
    datagen.imagenet_tree(tmp_path / "src", datagen.imagenet_content(4, 20, 4, awkward_files=False))
    manifest, _ = run(tmp_path / "src", tmp_path / "out", shard_size=20_000, splits=("train",))
    samples = datagen.read_split(manifest, "train")
    first = samples[: manifest.split("train").shards[0].num_samples]
    assert len({int(s["cls"]) for s in first}) > 1, "the first shard holds a single class"
    sizes = [s.size for s in manifest.split("train").shards]
    assert len(sizes) > 3 and max(sizes) <= 20_000 + 10_240  # + the tar's end record padding

    capped, _ = run(
        tmp_path / "src", tmp_path / "capped", max_per_shard=7, shard_size=10**9, splits=("train",)
    )
    assert [s.num_samples for s in capped.split("train").shards] == [7] * 11 + [3]

    other_seed, _ = run(tmp_path / "src", tmp_path / "seed1", seed=1, shard_size=20_000, splits=("train",))
    assert [s["__key__"] for s in datagen.read_split(other_seed, "train")] != [s["__key__"] for s in samples]


def test_limit_and_resize(tmp_path):
    content = datagen.imagenet_content(2, 6, 2, awkward_files=False)
    content.train["n01440764"].append(("n01440764_big.JPEG", datagen.jpeg(5, (300, 200)), "ok"))
    datagen.imagenet_tree(tmp_path / "src", content)
    manifest, _ = run(tmp_path / "src", tmp_path / "out", limit=5, image=ImageOptions(resize=24, quality=80))
    assert manifest.split("train").num_samples == 5 and manifest.split("val").num_samples == 2
    assert manifest.build["resize"] == 24 and manifest.build["limit"] == 5
    for s in datagen.read_split(manifest, "train"):
        assert min(Image.open(io.BytesIO(s["jpg"])).size) <= 24

    full, _ = run(tmp_path / "src", tmp_path / "full", image=ImageOptions(resize=100), splits=("train",))
    big = next(s for s in datagen.read_split(full, "train") if s["__key__"] == "n01440764_big")
    assert Image.open(io.BytesIO(big["jpg"])).size == (150, 100)


def test_file_listing_order_does_not_matter(tmp_path, monkeypatch):
    content = datagen.imagenet_content()
    datagen.imagenet_tree(tmp_path / "a" / "src", content)
    datagen.imagenet_tree(tmp_path / "b" / "src", content, reverse=True)
    a, _ = run(tmp_path / "a" / "src", tmp_path / "out-a")
    datagen.shuffled_listing(monkeypatch)
    b, _ = run(tmp_path / "b" / "src", tmp_path / "out-b")
    assert [s.sha256 for _, s in a.shards()] == [s.sha256 for _, s in b.shards()]
    assert (tmp_path / "out-a" / "manifest.json").read_bytes() == (
        tmp_path / "out-b" / "manifest.json"
    ).read_bytes()


def test_manifest_has_no_absolute_paths_or_times(tmp_path):
    datagen.tiny_imagenet(tmp_path / "src")
    run(tmp_path / "src", tmp_path / "out")
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert str(tmp_path) not in text
    for _, shard in load(tmp_path / "out").shards():
        assert str(tmp_path).encode() not in (tmp_path / "out" / shard.name).read_bytes()


def test_known_dataset_is_named_and_missing_images_are_counted(tmp_path, caplog):
    datagen.cifar10(tmp_path / "src", per_batch=2, test=3)
    manifest, report = run(tmp_path / "src", tmp_path / "out")
    assert manifest.dataset == "cifar-10"
    assert "cifar-10 train: found 10 of 50,000 images (49,990 missing)" in report.notes
    named, _ = run(tmp_path / "src", tmp_path / "named", name="my-cifar")
    assert named.dataset == "my-cifar"


def test_strict_stops_at_a_bad_file(tmp_path):
    datagen.tiny_imagenet(tmp_path / "src")
    with pytest.raises(BuildError, match=r"train/n0\d+/images/n0\d+_\d\.JPEG: .* \(--strict\)"):
        run(tmp_path / "src", tmp_path / "out", strict=True)


def test_parse_size():
    assert parse_size("256MB") == 256_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("1.5 kb") == 1500
    assert parse_size("4096") == 4096
    with pytest.raises(BuildError, match="cannot read size"):
        parse_size("big")


def test_an_interrupted_build_waits_for_few_shard_closes(tmp_path, monkeypatch):
    """Packing small shards outruns their fsyncs: the closes queued when Ctrl-C comes must stay few, or
    the interrupted build sits waiting for every queued sync (seen: over 30 s on a busy disk)."""
    from shardtool import build as build_module
    from shardtool.journal import Journal

    journal = Journal.open(tmp_path, fingerprint="fingerprint", build_info={}, overwrite=False)
    append = journal.append

    def slow_append(entry):
        time.sleep(0.05)  # a slow fsync
        return append(entry)

    monkeypatch.setattr(journal, "append", slow_append)
    packer = build_module._Packer(journal, split="train", options=BuildOptions(max_per_shard=1))
    for i in range(40):
        packer.add(i, f"k{i:03d}", {"cls": b"%d" % i})
    started = time.monotonic()
    packer.abort()  # what an interruption does
    took = time.monotonic() - started
    assert took < 0.05 * build_module.MAX_CLOSING + 0.2, f"abort waited {took:.2f} s"
    closed = sorted(p.name for p in tmp_path.glob("train-*.tar"))
    assert closed == [f"train-{n:06d}.tar" for n in range(len(closed))] and len(closed) >= 37
    journalled = [json.loads(line) for line in journal.path.read_text().splitlines()[1:]]
    assert [e["shard"]["name"] for e in journalled] == closed
