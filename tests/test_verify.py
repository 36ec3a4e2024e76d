"""verify.py and `shardtool verify` / `shardtool info`: size, sha256 and sample-count checks, summaries."""

from __future__ import annotations

import dataclasses
import json

from shardtool.manifest import load
from shardtool.verify import check_shard, count_samples, verify_manifest, verify_shard
from tests.shardset import make_shard_set
from tests.util import cli


def test_verify_shard_checks_size_then_hash(tmp_path):
    m = make_shard_set(tmp_path, {"train": (3, 4)})
    shards = m.split("train").shards
    assert all(verify_shard(tmp_path / s.name, s) is None for s in shards)
    path = tmp_path / shards[0].name
    data = bytearray(path.read_bytes())
    data[700] ^= 1
    path.write_bytes(bytes(data))
    assert verify_shard(path, shards[0]) == "sha256 differs from the manifest"
    path.write_bytes(bytes(data[:-512]))
    assert verify_shard(path, shards[0]) == f"size {shards[0].size - 512} bytes, expected {shards[0].size}"
    path.unlink()
    assert verify_shard(path, shards[0]) == "missing"


def test_sample_count_comes_from_the_tar(tmp_path):
    m = make_shard_set(tmp_path, {"train": (2, 5)}, payload=100)
    shard = m.split("train").shards[0]
    assert count_samples(tmp_path / shard.name) == 5  # 4 members per sample (jpg, cls, json, bin)
    wrong = dataclasses.replace(shard, num_samples=6)
    assert check_shard(tmp_path / shard.name, wrong) == "5 samples, expected 6"
    assert verify_manifest(m, progress=False) == []


def test_cli_verify_lists_the_bad_shards(tmp_path):
    m = make_shard_set(tmp_path, {"train": (3, 4), "val": (1, 4)})
    ok = cli("shardtool", "verify", tmp_path / "manifest.json")
    assert ok.returncode == 0 and "ok: 4 shards" in ok.stderr
    names = [s.name for _, s in m.shards()]
    (tmp_path / names[1]).write_bytes(b"x" * 10)
    (tmp_path / names[3]).unlink()
    bad = cli("shardtool", "verify", tmp_path / "manifest.json")
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"{tmp_path / names[1]}: size 10 bytes, expected {m.split('train').shards[1].size}",
        f"{tmp_path / names[3]}: missing",
    ]
    assert bad.stderr.strip() == "Error: 2 of 4 shards failed verification (listed above)"
    missing = cli("shardtool", "verify", tmp_path / "nothing.json")
    assert missing.returncode == 1 and "no such manifest" in missing.stderr


def test_cli_info(tmp_path):
    m = make_shard_set(tmp_path, {"train": (2, 3), "val": (1, 2)})
    text = cli("shardtool", "info", tmp_path / "manifest.json", check=True).stdout
    assert "dataset      testset (layout folder" in text
    assert "train        6 samples in 2 shards" in text and "val          2 samples in 1 shards" in text
    summary = json.loads(cli("shardtool", "info", tmp_path, "--json", check=True).stdout)
    assert summary["splits"]["train"] == {
        "num_samples": 6,
        "num_bytes": m.split("train").num_bytes,
        "num_shards": 2,
        "labeled": True,
    }
    assert summary["num_classes"] == 4 and summary["fingerprint"] == load(tmp_path).fingerprint()
