"""writer.py: shards are reproducible, readable by tarfile and webdataset, and never half-written."""

from __future__ import annotations

import hashlib
import tarfile

import pytest
import webdataset as wds

from shardtool.writer import ShardWriter
from tests.shardset import make_shard_set


def test_same_samples_give_same_bytes(tmp_path):
    a = make_shard_set(tmp_path / "a")
    b = make_shard_set(tmp_path / "b")
    assert [s.sha256 for _, s in a.shards()] == [s.sha256 for _, s in b.shards()]
    for _, shard in a.shards():
        data = (tmp_path / "a" / shard.name).read_bytes()
        assert len(data) == shard.size
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        assert (tmp_path / "a" / shard.name).stat().st_mode & 0o777 == 0o644


def test_shards_read_back_with_tarfile_and_webdataset(tmp_path):
    m = make_shard_set(tmp_path, {"train": (2, 5)})
    for _, shard in m.shards():
        with tarfile.open(tmp_path / shard.name) as tar:
            members = tar.getmembers()
        assert len(members) == 15
        assert all(t.mtime == 0 and t.uid == 0 and t.uname == "" and t.mode == 0o444 for t in members)
    urls = [str(tmp_path / s.name) for _, s in m.shards()]
    samples = list(wds.WebDataset(urls, shardshuffle=False).to_tuple("jpg", "cls"))
    assert len(samples) == 10
    assert [int(c) for _, c in samples] == [i % 4 for i in range(10)]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "train-000000.tar") as w:
        w.write("k", {"jpg": b"x", "cls": b"0"})
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_keys_with_dots_are_refused(tmp_path):
    w = ShardWriter(tmp_path / "x.tar")
    with pytest.raises(ValueError, match=r"no '\.'"):
        w.write("a.b", {"cls": b"0"})
    w.abort()


@pytest.mark.parametrize("seed", range(6))
def test_bytes_equal_webdatasets_tarwriter(tmp_path, seed):
    """The hand-built headers give exactly the archive webdataset's TarWriter (over tarfile) writes."""
    import io
    import random

    rng = random.Random(seed)
    samples = []
    for i in range(rng.randint(1, 30)):
        key = f"k{i}_" + "x" * rng.choice([1, 40, 95, 120])  # past 100 characters: tarfile's PAX path
        sizes = [0, 1, 511, 512, 513, rng.randint(0, 5000)]
        samples.append((key, {ext: rng.randbytes(rng.choice(sizes)) for ext in ("jpg", "cls", "json")}))
    with ShardWriter(tmp_path / "ours.tar", fsync=False) as w:
        for key, fields in samples:
            w.write(key, fields)
    reference = io.BytesIO()
    tw = wds.TarWriter(reference, user="", group="", mode=0o444, mtime=0, encoder=False)
    for key, fields in samples:
        tw.write({"__key__": key, **fields})
    tw.close()
    assert (tmp_path / "ours.tar").read_bytes() == reference.getvalue()
