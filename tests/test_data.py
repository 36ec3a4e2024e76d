"""The streaming pipeline on real shards: exact counts and labels, completion events after consumption,
corrupt samples and truncated shards counted, deterministic validation, worker counts 0/1/2."""

from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing as mp
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from hivetrain.data import (
    Batch,
    LoaderOptions,
    ShardDone,
    ShardRef,
    ShardStream,
    shard_refs,
    train_stream,
    val_stream,
)
from hivetrain.errors import DataError
from hivetrain.transforms import Recipe
from shardtool.writer import ShardWriter
from tests.shardset import jpeg, make_shard_set
from tests.util import wait_until

NUM_CLASSES = 4
TRAIN_SHARDS, PER_SHARD = 5, 10
VAL_SHARDS, PER_VAL_SHARD = 3, 7
RECIPE = Recipe(32)


@pytest.fixture(scope="module")
def shardset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = make_shard_set(
        out, {"train": (TRAIN_SHARDS, PER_SHARD), "val": (VAL_SHARDS, PER_VAL_SHARD)}, num_classes=NUM_CLASSES
    )
    return manifest


def label_of(key: str) -> int:
    """make_shard_set labels sample number i with i % num_classes and names it <split>_<i>."""
    return int(key.rsplit("_", 1)[1]) % NUM_CLASSES


def run(stream) -> tuple[list[Batch | ShardDone], list[str]]:
    """Consume a stream; returns its items and the keys of all samples in order."""
    items = list(stream)
    keys = [k for item in items if isinstance(item, Batch) for k in item.keys]
    return items, keys


def check_completion_order(items: list[Batch | ShardDone]) -> None:
    """Each ShardDone comes after the batches holding its samples (a shard read twice, in two epochs,
    may have samples of both reads in flight, hence at least rather than exactly)."""
    pending: Counter[str] = Counter()
    for item in items:
        if isinstance(item, Batch):
            pending.update(item.shards)
        else:
            assert pending[item.shard] >= item.samples, f"{item.shard}: done before its samples were consumed"
            pending[item.shard] -= item.samples
    assert not +pending, f"samples of unfinished shards: {pending}"


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_train_stream_counts_labels_and_completion(shardset, workers):
    refs = shard_refs(shardset, "train")
    # The first shard comes round again (a second epoch): a separate read with its own completion.
    tagged = [ShardRef(r.path, r.name, r.num_samples, tag=("epoch0", r.name)) for r in refs]
    tagged.append(ShardRef(refs[0].path, refs[0].name, refs[0].num_samples, tag=("epoch1", refs[0].name)))
    fed = []

    def feed():
        for ref in tagged:
            fed.append(ref.tag)
            yield ref

    options = LoaderOptions(batch_size=7, workers=workers, shuffle_buffer=16, seed=1)
    stream = ShardStream(feed(), RECIPE, options, train=True, num_classes=NUM_CLASSES)
    items, keys = run(stream)

    expected = Counter({f"train_{i:08d}": 1 for i in range(TRAIN_SHARDS * PER_SHARD)})
    expected.update(f"train_{i:08d}" for i in range(PER_SHARD))  # the first shard, read twice
    assert Counter(keys) == expected
    batches = [b for b in items if isinstance(b, Batch)]
    for batch in batches:
        assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == (3, 32, 32)
        assert batch.labels.dtype == torch.int64
        assert batch.labels.tolist() == [label_of(k) for k in batch.keys]
        assert len(batch) <= 7
    assert keys != sorted(keys), "the shuffle buffer mixed nothing"

    done = [d for d in items if isinstance(d, ShardDone)]
    assert sorted(d.tag for d in done) == sorted(fed)
    assert all(d.samples == PER_SHARD and d.skipped == 0 and d.error is None for d in done)
    check_completion_order(items)
    stats = stream.stats
    assert (stats.shards, stats.samples, stats.skipped) == (TRAIN_SHARDS + 1, expected.total(), 0)
    assert stream.unfinished() == []


def test_shard_done_waits_for_the_training_loop(shardset):
    """The event for a shard comes only when the loop asks for more after the batch holding its end."""
    ref = shard_refs(shardset, "train")[0]
    options = LoaderOptions(batch_size=PER_SHARD, workers=0, shuffle_buffer=0)
    it = iter(ShardStream([ref], RECIPE, options, train=True, num_classes=NUM_CLASSES))
    batch = next(it)
    assert isinstance(batch, Batch) and len(batch) == PER_SHARD
    done = next(it)  # the loop came back: the batch is consumed
    assert isinstance(done, ShardDone) and done.samples == PER_SHARD
    assert next(it, None) is None


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> ShardRef:
    with ShardWriter(path, fsync=False) as w:
        for key, fields in samples:
            w.write(key, fields)
    return ShardRef(path, num_samples=len(samples))


def cut_before_sample(path: str, index: int, extra: int = 0) -> bytes:
    """The shard's bytes up to the header of its `index`-th sample, plus `extra` bytes beyond it."""
    with tarfile.open(path) as tar:
        starts = [m.offset for m in tar.getmembers() if m.name.endswith(".cls")]
    return Path(path).read_bytes()[: starts[index] + extra]


def png(label: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10 * label, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, shardset):
    """Shards with known damage, and what each must report: (ref, used keys, corrupt, missing)."""
    out = tmp_path_factory.mktemp("damaged")
    good = jpeg(1, seed=5)
    mixed = write_shard(
        out / "mixed-000000.tar",
        [
            ("ok_0", {"cls": b"1", "jpg": good}),
            ("garbage_1", {"cls": b"1", "jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4}),
            ("truncjpeg_2", {"cls": b"1", "jpg": good[: len(good) // 2]}),
            ("badcls_3", {"cls": b"cat", "jpg": good}),
            ("range_4", {"cls": b"9", "jpg": good}),
            ("nocls_5", {"jpg": good}),
            ("noimage_6", {"cls": b"1", "json": b"{}"}),
            ("png_7", {"cls": b"2", "png": png(2)}),
            ("ok_8", {"cls": b"3", "jpg": jpeg(3, seed=6)}),
        ],
    )
    # A tar cut inside the fourth sample's image data (after the .cls member and the .jpg header):
    # three samples, a fragment (counted corrupt), and a read error.
    source = shard_refs(shardset, "train")[1]
    cut = out / "cut-000000.tar"
    cut.write_bytes(cut_before_sample(source.path, 3, extra=3 * 512 + 100))
    # A tar cut exactly at a header boundary: no error at all, only the count shows the loss.
    silent = out / "silent-000000.tar"
    silent.write_bytes(cut_before_sample(source.path, 5))
    first = int(source.name.split("-")[1].split(".")[0]) * PER_SHARD
    return [
        (mixed, ["ok_0", "png_7", "ok_8"], 6, 0),
        (ShardRef(cut, num_samples=PER_SHARD), [f"train_{first + i:08d}" for i in range(3)], 1, 6),
        (ShardRef(silent, num_samples=PER_SHARD), [f"train_{first + i:08d}" for i in range(5)], 0, 5),
        (ShardRef(out / "absent-000000.tar", num_samples=4), [], 0, 4),
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(damaged, workers):
    refs = [ref for ref, *_ in damaged]
    options = LoaderOptions(batch_size=4, workers=workers, shuffle_buffer=8)
    stream = ShardStream(refs, RECIPE, options, train=True, num_classes=NUM_CLASSES)
    items, keys = run(stream)
    assert sorted(keys) == sorted(k for _, used, *_ in damaged for k in used)
    by_shard = {d.shard: d for d in items if isinstance(d, ShardDone)}
    assert set(by_shard) == {ref.name for ref in refs}
    for ref, used, corrupt, missing in damaged:
        done = by_shard[ref.name]
        assert (done.samples, done.corrupt, done.missing) == (len(used), corrupt, missing), ref.name
        assert done.samples + done.skipped == ref.num_samples
    assert by_shard["absent-000000.tar"].error == "FileNotFoundError: No such file or directory"
    assert by_shard["cut-000000.tar"].error == "ReadError: unexpected end of data"
    assert by_shard["silent-000000.tar"].error is None  # nothing but the count noticed
    check_completion_order(items)
    stats = stream.stats
    assert (stats.corrupt, stats.missing, stats.shard_errors) == (7, 15, 2)
    labels = {k: lbl for b in items if isinstance(b, Batch) for k, lbl in zip(b.keys, b.labels.tolist())}
    assert (labels["ok_0"], labels["png_7"], labels["ok_8"]) == (1, 2, 3)


def test_train_stream_takes_sample_counts_from_the_manifest(shardset, tmp_path):
    """A truncated copy of a real shard, fed by path only: the manifest's count exposes the loss."""
    source = shard_refs(shardset, "train")[2]
    copy = tmp_path / source.name
    copy.write_bytes(cut_before_sample(source.path, 4))
    options = LoaderOptions(batch_size=8, workers=0)
    items, _ = run(train_stream(shardset, [str(copy)], options=options, image_size=32))
    (done,) = [d for d in items if isinstance(d, ShardDone)]
    assert (done.shard, done.samples, done.missing) == (source.name, 4, PER_SHARD - 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_val_stream_is_complete_ordered_and_repeatable(shardset, workers):
    options = LoaderOptions(batch_size=4, workers=workers)
    with val_stream(shardset, options=options, image_size=32) as stream:
        passes = []
        for _ in range(2):
            batches = list(stream.batches())
            passes.append(batches)
            assert stream.stats.shards == VAL_SHARDS and stream.stats.samples == VAL_SHARDS * PER_VAL_SHARD
        first, second = passes
    keys = [k for b in first for k in b.keys]
    all_val = [f"val_{TRAIN_SHARDS * PER_SHARD + i:08d}" for i in range(VAL_SHARDS * PER_VAL_SHARD)]
    if workers == 0:
        assert keys == all_val  # shard order, sample order
    else:
        assert sorted(keys) == all_val
    assert [b.keys for b in first] == [b.keys for b in second]
    for a, b in zip(first, second):
        assert torch.equal(a.images, b.images)  # evaluation transforms are deterministic
        assert a.labels.tolist() == [label_of(k) for k in a.keys]


def test_unlabeled_split_gives_label_minus_one(shardset):
    unlabeled = dataclasses.replace(
        shardset, splits={"test": dataclasses.replace(shardset.split("val"), labeled=False)}
    )
    batches = list(
        val_stream(unlabeled, split="test", options=LoaderOptions(workers=0), image_size=32).batches()
    )
    labels = torch.cat([b.labels for b in batches])
    assert len(labels) == VAL_SHARDS * PER_VAL_SHARD and set(labels.tolist()) == {-1}


def test_feed_that_waits_for_completion_does_not_deadlock(shardset):
    """The feed withholds the next shard until the previous one is reported done (as the assigner does
    at an epoch's end); workers must empty their shuffle buffers rather than wait for more input."""
    refs = shard_refs(shardset, "train")[:3]
    finished = threading.Event()

    def feed():
        for ref in refs:
            finished.clear()
            yield ref
            if not finished.wait(timeout=30):
                raise AssertionError(f"{ref.name} never reported done")

    options = LoaderOptions(batch_size=64, workers=2, shuffle_buffer=1000, flush_after=0.2)
    stream = ShardStream(feed(), RECIPE, options, train=True, num_classes=NUM_CLASSES)
    done = []
    for item in stream:
        if isinstance(item, ShardDone):
            done.append(item.shard)
            finished.set()
    assert done == [r.name for r in refs]


def test_feed_errors_reach_the_training_loop(shardset):
    refs = shard_refs(shardset, "train")

    def feed():
        yield refs[0]
        raise DataError("shard cache: disk full")

    stream = ShardStream(feed(), RECIPE, LoaderOptions(batch_size=4, workers=1), train=True)
    with pytest.raises(DataError, match="disk full"):
        run(stream)


def test_stopping_early_leaves_no_workers_and_reports_unfinished_shards(shardset):
    refs = shard_refs(shardset, "train")
    stream = ShardStream(refs, RECIPE, LoaderOptions(batch_size=4, workers=2), train=True)
    it = iter(stream)
    next(it)
    it.close()
    wait_until(lambda: not mp.active_children(), timeout=15, what="loader workers to exit")
    assert stream.unfinished(), "shards were in flight when the loop stopped"
    assert {r.name for r in stream.unfinished()} <= {r.name for r in refs}
    with pytest.raises(DataError, match="reads its feed once"):
        next(iter(stream))


def test_gpu_decode_without_cuda_falls_back_with_one_warning(shardset, caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the fallback does not apply")
    options = LoaderOptions(batch_size=8, workers=1, decode="gpu")
    with caplog.at_level(logging.WARNING, logger="hivetrain"):
        stream = val_stream(shardset, options=options, image_size=32)
        batches = list(stream.batches())
    warnings = [r.getMessage() for r in caplog.records if "decode='gpu'" in r.getMessage()]
    assert len(warnings) == 1 and "CUDA is not available" in warnings[0]
    assert sum(len(b) for b in batches) == VAL_SHARDS * PER_VAL_SHARD
    assert all(b.images.dtype == torch.float32 and b.images.device.type == "cpu" for b in batches)


def test_cuda_device_without_cuda_is_a_clear_error(shardset):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(DataError) as e:
        val_stream(shardset, options=LoaderOptions(device="cuda"), image_size=32)
    assert str(e.value) == "loader option device is 'cuda', but CUDA is not available here"


def test_missing_val_shard_is_a_clear_error(shardset, tmp_path):
    for ref in shard_refs(shardset, "val")[:2]:
        shutil.copy(ref.path, tmp_path)
    with pytest.raises(DataError) as e:
        val_stream(shardset, tmp_path, image_size=32)
    assert str(e.value) == (
        f"{tmp_path}: 1 of 3 val shards are missing (first: val-000002.tar); "
        "fetch them with `shardtool fetch --split val`"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "loader option batch_size must be at least 1, not 0"),
        ({"workers": -1}, "loader option workers must be at least 0, not -1"),
        ({"decode": "tpu"}, "loader option decode must be 'cpu' or 'gpu', not 'tpu'"),
        ({"device": "gpu0"}, "loader option device: 'gpu0' is not a torch device"),
    ],
)
def test_bad_loader_options_are_clear_errors(options, message):
    with pytest.raises(DataError) as e:
        LoaderOptions(**options)
    assert str(e.value) == message


def test_no_flip_keeps_every_image_the_right_way_round(tmp_path):
    """Images whose left half is red and right half blue: with flips off no training sample comes out
    mirrored; with them on (the default), about half of those whose crop spans both halves do."""
    buf = io.BytesIO()
    img = Image.new("RGB", (32, 32), (220, 30, 30))
    img.paste((30, 30, 220), (16, 0, 32, 32))
    img.save(buf, "JPEG", quality=95)
    with ShardWriter(tmp_path / "train-000000.tar", fsync=False) as w:
        for i in range(64):
            w.write(f"s_{i:04d}", {"jpg": buf.getvalue(), "cls": b"0"})
    manifest = make_shard_set(tmp_path / "ref", {"train": (1, 1)}, num_classes=NUM_CLASSES)
    options = LoaderOptions(batch_size=16, workers=0)

    def mirrored(flip: bool) -> int:
        items, _ = run(train_stream(manifest, [str(tmp_path / "train-000000.tar")], options=options,
                                    image_size=32, flip=flip))  # fmt: skip
        images = torch.cat([b.images for b in items if isinstance(b, Batch)])
        red_minus_blue = images[:, 0] - images[:, 2]  # normalised; > 0 where red dominates
        left, right = red_minus_blue[..., :8].mean(dim=(1, 2)), red_minus_blue[..., -8:].mean(dim=(1, 2))
        decisive = (left - right).abs() > 0.5  # the random crop may hold one half only
        assert len(images) == 64 and int(decisive.sum()) >= 32
        return int((decisive & (left < right)).sum()), int(decisive.sum())

    assert mirrored(flip=False)[0] == 0
    flipped, seen = mirrored(flip=True)
    assert 0.2 * seen <= flipped <= 0.8 * seen  # fair coin flips
