"""`--sync diloco` over emulated internet links (tests/wanlab.py; needs root): what a slow link does to
joining a run.

A state download is the whole model in fp32; on a volunteer's link it can take longer than the time
between two rounds, so the state a joiner receives is already old when it lands.
"""

from __future__ import annotations

import pytest

from tests.shardset import make_shard_set
from tests.test_train import jsonl
from tests.util import wait_until
from tests.wanlab import WanLab, start_diloco_peers, unavailable_reason

pytestmark = [pytest.mark.wan, pytest.mark.slow]


def last(log_dir) -> dict:
    lines = [m for m in jsonl(log_dir / "metrics.jsonl") if "step" in m]
    return lines[-1] if lines else {}


@pytest.mark.timeout(600)
def test_a_joiner_whose_download_outlasts_a_round_catches_up(tmp_path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    manifest = make_shard_set(tmp_path / "shards", {"train": (24, 16), "val": (1, 16)}).origin
    logs = [tmp_path / f"peer{i}" for i in range(3)]
    # 16 local steps are ~8 s here; the model's state (ResNet-18, 45 MB in fp32) takes longer than that
    # over 40 Mbit/s, and longer still while the link carries the others' rounds
    with WanLab(peers=3, rate_mbit=40, rtt_ms=10) as lab:

        def before(i: int) -> None:
            if i == 2:  # the third peer joins a run that has averaged a few times
                wait_until(lambda: all(last(d).get("sync_rounds", 0) >= 3 for d in logs[:2]), timeout=300,
                           what="the first two peers to average three times")  # fmt: skip

        procs = start_diloco_peers(
            lab, manifest, logs, "--run-id", "join", "--local-steps", "16", before=before
        )
        joiner = logs[2]
        wait_until(lambda: last(joiner).get("sync_rounds", 0) >= 3, timeout=300,
                   what="the joiner to take part in three rounds as a member in step")  # fmt: skip
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=120)

    out = (joiner / "stdout.txt").read_text()
    downloads = out.count("downloading its state") + out.count("taking the run's state")
    print(f"  joiner: {downloads} state download(s), {last(joiner)['sync_rounds']} rounds in step")
    assert "round(s) that landed during the" in out
    assert downloads <= 3, "each download was already behind when it landed"
    # in step: the joiner holds the run's newest state, or the one before (a round may be landing);
    # another peer may be catching up itself when the run stops (a round can fail for one member only)
    versions = [last(d)["sync_version"] for d in logs]
    assert max(versions) - versions[2] <= 1, versions
