"""manifest.py: round trips, canonical bytes, and rejection of hostile or malformed manifests."""

from __future__ import annotations

import copy
import json

import pytest

from shardtool import manifest as mf
from shardtool.errors import ManifestError


def sample_manifest() -> mf.Manifest:
    shards = [mf.Shard(f"train-{i:06d}.tar", 1000 + i, f"{i:064x}", 10) for i in range(3)]
    return mf.Manifest(
        dataset="demo",
        layout="folder",
        classes=[mf.ClassInfo("a", "apple"), mf.ClassInfo("b", "banana")],
        splits={"train": mf.Split(shards), "val": mf.Split([mf.Shard("val-000000.tar", 5, "f" * 64, 2)])},
        build={"seed": 0},
        skipped=[{"path": "train/a/x.jpg", "reason": "truncated JPEG"}],
    )


def test_round_trip_is_canonical(tmp_path):
    m = sample_manifest()
    m.save(tmp_path / "manifest.json")
    loaded = mf.load(tmp_path)
    assert loaded == m
    assert loaded.to_json() == (tmp_path / "manifest.json").read_text()
    assert loaded.split("train").num_samples == 30
    assert loaded.split("train").num_bytes == 3003
    assert loaded.find_shard("val-000000.tar")[0] == "val"
    assert loaded.base_dir == tmp_path
    assert [s.name for _, s in loaded.shards()] == [
        *(f"train-{i:06d}.tar" for i in range(3)),
        "val-000000.tar",
    ]


def test_fingerprint_ignores_sources_but_not_data():
    a, b = sample_manifest(), sample_manifest()
    b.sources.http.append("http://mirror.example/")
    assert a.fingerprint() == b.fingerprint()
    b.splits["val"].shards[0] = mf.Shard("val-000000.tar", 5, "e" * 64, 2)
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "/abs.tar",
        "a/b.tar",
        "a\\b.tar",
        "x\x00.tar",
        "..tar",
        "a..b.tar",
        ".hidden.tar",
        "noext",
        "",
        7,
        None,
    ],
)
def test_unsafe_shard_names_are_rejected(name):
    d = sample_manifest().to_dict()
    d["splits"]["train"]["shards"][0]["name"] = name
    del d["splits"]["train"]["num_samples"]
    with pytest.raises(ManifestError, match="shard name"):
        mf.Manifest.from_dict(d, "m.json")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("splits", "train", "shards", 0, "size"), -1, "size must be an integer"),
        (("splits", "train", "shards", 0, "size"), 1 << 50, "size must be an integer"),
        (("splits", "train", "shards", 0, "num_samples"), "10", "num_samples must be an integer"),
        (("splits", "train", "shards", 0, "sha256"), "xyz", "sha256"),
        (("splits", "train", "num_samples"), 999, "add up to"),
        (("format",), "webdataset", "not a shardtool manifest"),
        (("version",), 99, "version 99 is not supported"),
        (("sources", "http"), ["file:///etc/passwd"], "not an http"),
        (("classes",), "abc", "classes must be a list"),
    ],
)
def test_malformed_fields_name_the_problem(path, value, message):
    d = copy.deepcopy(sample_manifest().to_dict())
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ManifestError, match=message) as info:
        mf.Manifest.from_dict(d, "m.json")
    assert str(info.value).startswith("m.json: ")


def test_duplicate_shard_names_are_rejected():
    d = sample_manifest().to_dict()
    d["splits"]["val"]["shards"][0]["name"] = "train-000000.tar"
    with pytest.raises(ManifestError, match="appears twice"):
        mf.Manifest.from_dict(d, "m.json")


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        mf.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.load(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ManifestError, match="must be an object"):
        mf.load(bad)


def test_unknown_split_lists_the_known_ones():
    with pytest.raises(ManifestError, match=r"no split 'test' \(it has: train, val\)"):
        sample_manifest().split("test")


def test_load_by_url_adds_the_server_as_source(tmp_path):
    from shardtool.transport.serve import ShardServer

    sample_manifest().save(tmp_path / "manifest.json")
    with ShardServer(tmp_path) as server:
        m = mf.load(server.url + "manifest.json")
        assert m.sources.http == [server.url] and m.origin == server.url + "manifest.json"
        with pytest.raises(ManifestError, match="HTTP 404"):
            mf.load(server.url + "other.json")
    with pytest.raises(ManifestError, match="cannot fetch"):
        mf.load(server.url + "manifest.json")


def test_written_files_are_readable_by_others(tmp_path):
    sample_manifest().save(tmp_path / "manifest.json")
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644
