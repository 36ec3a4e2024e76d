"""Claims -> shard cache -> stream, over a real HTTP server: corrupt shards are caught, nothing is lost."""

from __future__ import annotations

import json
import shutil

import pytest

from hivetrain.assign import ShardAssigner
from hivetrain.cache import ShardCache
from hivetrain.data import Batch, LoaderOptions, ShardDone, train_stream
from hivetrain.feed import MAX_READ_AHEAD, ClaimFeed, read_ahead
from shardtool import manifest as mf
from shardtool.transport.serve import ShardServer
from tests.shardset import make_shard_set


def corrupt(path, offset=5000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def run_feed(manifest, tmp_path, *, mirrors=(), limit=None):
    """Stream one epoch of claims through the cache; returns (labels seen per shard, feed, cache)."""
    names = [s.name for s in manifest.split("train").shards]
    assigner = ShardAssigner(names, dht=None, run_id="t", log_dir=tmp_path / "logs", max_epochs=1).start()
    cache = ShardCache(manifest, tmp_path / "cache", mirrors=mirrors, limit_bytes=limit, timeout=5)
    feed = ClaimFeed(assigner, cache)
    stream = train_stream(
        manifest, feed, options=LoaderOptions(batch_size=8, workers=0, shuffle_buffer=10), image_size=32
    )
    samples: dict[str, int] = {}
    try:
        for item in stream:
            if isinstance(item, ShardDone):
                feed.finish(item)
            elif isinstance(item, Batch):
                for shard in item.shards:
                    samples[shard] = samples.get(shard, 0) + 1
    finally:
        stream.close()
        assigner.close()
        cache.close()
    return samples, feed, cache


@pytest.fixture
def served(tmp_path):
    make_shard_set(tmp_path / "origin", {"train": (6, 10), "val": (1, 10)})
    with ShardServer(tmp_path / "origin") as server:
        yield tmp_path / "origin", server


def test_streams_every_sample_from_http(served, tmp_path):
    _, server = served
    manifest = mf.load(server.url + "manifest.json")
    samples, feed, cache = run_feed(manifest, tmp_path)
    assert samples == {s.name: 10 for s in manifest.split("train").shards}
    assert feed.shards_read == 6 and feed.unavailable == []
    assert cache.stats.fetched == 6 and cache.stats.fetched_bytes == manifest.split("train").num_bytes
    lines = [json.loads(x) for x in (tmp_path / "logs" / "shards.jsonl").read_text().splitlines()]
    assert sorted(x["shard"] for x in lines) == sorted(samples)
    assert all(x["samples"] == 10 and x["epoch"] == 0 for x in lines)


def test_corrupt_shard_on_one_mirror_is_refetched_from_another(served, tmp_path):
    origin, server = served
    bad_dir = tmp_path / "bad"
    shutil.copytree(origin, bad_dir)
    corrupt(bad_dir / "train-000002.tar")
    with ShardServer(bad_dir) as bad:
        manifest = mf.load(bad.url + "manifest.json")  # the bad mirror is the manifest's own source
        samples, feed, _ = run_feed(manifest, tmp_path, mirrors=(server.url,))
    assert samples == {s.name: 10 for s in manifest.split("train").shards}
    assert feed.unavailable == []


def test_shard_no_source_can_serve_is_skipped_and_reported(served, tmp_path):
    origin, server = served
    corrupt(origin / "train-000003.tar")
    manifest = mf.load(server.url + "manifest.json")
    samples, feed, _ = run_feed(manifest, tmp_path)
    assert "train-000003.tar" not in samples
    assert samples == {s.name: 10 for s in manifest.split("train").shards if s.name != "train-000003.tar"}
    assert feed.unavailable == ["train-000003.tar"]
    assert feed.fetch_failures == feed.max_failures
    assert not (tmp_path / "cache" / "train-000003.tar").exists()


def test_bounded_cache_evicts_shards_already_read(tmp_path):
    make_shard_set(tmp_path / "origin", {"train": (12, 10)})
    with ShardServer(tmp_path / "origin") as server:
        manifest = mf.load(server.url + "manifest.json")
        one = manifest.split("train").shards[0].size
        # Several shards are in use at once (read, queued, downloading ahead); a 6-shard cache must
        # evict shards already read, and never one still being read (no sample may go missing).
        samples, _, cache = run_feed(manifest, tmp_path, limit=6 * one)
    assert samples == {s.name: 10 for s in manifest.split("train").shards}
    assert cache.stats.evicted >= 2


def test_cache_evicts_least_recently_used_unpinned_shards(served, tmp_path):
    _, server = served
    manifest = mf.load(server.url + "manifest.json")
    s = manifest.split("train").shards
    cache = ShardCache(manifest, tmp_path / "cache", limit_bytes=3 * s[0].size)
    files = lambda: sorted(p.name for p in (tmp_path / "cache").glob("*.tar"))  # noqa: E731
    try:
        for shard in s[:3]:
            cache.get(shard)
        cache.unpin(s[0].name)
        cache.unpin(s[1].name)
        cache.get(s[0])  # s0 becomes the most recently used
        cache.unpin(s[0].name)
        cache.get(s[3])  # room is made by evicting s1, the least recently used unpinned shard
        assert files() == [s[0].name, s[2].name, s[3].name]
        cache.get(s[4])  # s2 and s3 are pinned: s0 goes
        assert files() == [s[2].name, s[3].name, s[4].name]
        cache.get(s[5])  # everything is in use: nothing may be evicted, the limit is exceeded
        assert files() == [x.name for x in s[2:6]]
        assert cache.stats.evicted == 2 and cache.stats.fetched == 6
    finally:
        cache.close()


def test_local_shards_beside_the_manifest_are_used_in_place(tmp_path):
    manifest = make_shard_set(tmp_path / "local", {"train": (3, 10)})
    samples, _, cache = run_feed(manifest, tmp_path)
    assert sum(samples.values()) == 30
    assert cache.stats.hits == 3 and cache.stats.fetched == 0
    assert not list((tmp_path / "cache").glob("*.tar"))


def test_damaged_local_copy_is_not_used(tmp_path):
    manifest = make_shard_set(tmp_path / "local", {"train": (2, 10)})
    corrupt(tmp_path / "local" / "train-000001.tar")
    samples, feed, _ = run_feed(manifest, tmp_path)  # no HTTP source: the damaged shard is unavailable
    assert samples == {"train-000000.tar": 10}
    assert feed.unavailable == ["train-000001.tar"]


def test_read_ahead_covers_a_claim_round_with_shards_to_read():
    # nothing measured yet, or claims as fast as reads: the floor
    assert read_ahead(least=4, claim_s=None, read_s=None) == 4
    assert read_ahead(least=4, claim_s=1.0, read_s=None) == 4
    # a 14 s claim round (a link full of averaging) against 4.5 s per shard: four more shards
    assert read_ahead(least=4, claim_s=14.0, read_s=4.5) == 8
    assert read_ahead(least=4, claim_s=0.5, read_s=4.5) == 5
    # never past the cap, however slow the DHT
    assert read_ahead(least=4, claim_s=600.0, read_s=0.1) == MAX_READ_AHEAD
