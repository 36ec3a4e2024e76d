"""Internet links under faults: a peer's link cut for a minute, then restored, in a real three-peer run.

Each peer sits behind its own emulated link (tests/wanlab.py: network namespaces, a delaying and shaping
forwarder; needs root). "Data lost" is shards of an epoch the run completed that no peer read.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.shardset import make_shard_set
from tests.test_train import jsonl
from tests.util import wait_until
from tests.wanlab import WanLab, start_diloco_peers, unavailable_reason

pytestmark = [pytest.mark.wan, pytest.mark.slow]

SHARDS = 24
CUT_S = 60.0


def last(log_dir, key: str = "step") -> dict:
    lines = [m for m in jsonl(log_dir / "metrics.jsonl") if key in m]
    return lines[-1] if lines else {}


def test_peer_whose_link_is_cut_for_a_minute_rejoins_and_nobody_waits(tmp_path, fault):
    fault.case(
        "network",
        f"one of 3 peers (--sync diloco) cut off for {CUT_S:.0f} s, then its link restored",
        lost_means="shards of an epoch the run completed that no peer read",
    )
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    manifest = make_shard_set(tmp_path / "shards", {"train": (SHARDS, 16), "val": (1, 16)}).origin
    logs = [tmp_path / f"peer{i}" for i in range(3)]
    with WanLab(peers=3, rate_mbit=40, rtt_ms=10) as lab:
        # 48 local steps (~25 s here) between rounds: a state download (the whole model in fp32 over
        # 40 Mbit/s) fits between two rounds, so a peer that takes the run's state is not behind again
        # by the time it has it
        procs = start_diloco_peers(
            lab, manifest, logs, "--run-id", "cut", "--lease", "10", "--local-steps", "48"
        )
        wait_until(lambda: all(last(d).get("sync_rounds", 0) >= 1 for d in logs), timeout=300,
                   what="every peer to average once")  # fmt: skip

        cut_at = time.time()
        lab.cut(1)
        time.sleep(CUT_S)
        lab.restore(1)
        restored_at = time.time()
        # it rejoins: it finds the others again (hivetrain.dht.Rejoiner re-contacts its initial peer
        # where the outage emptied the routing tables), then a round lands for it with them, or it
        # takes the run's state
        wait_until(
            lambda: last(logs[1]).get("peers", 0) == 3, timeout=120, what="peer 1 to see the others again"
        )
        rounds_at_rejoin = last(logs[1])["sync_rounds"]
        wait_until(
            lambda: "taking the run's state from peers" in (logs[1] / "stdout.txt").read_text()
            or last(logs[1]).get("sync_rounds", 0) > rounds_at_rejoin + 1,
            timeout=180, what="the cut-off peer to rejoin the averaging",
        )  # fmt: skip
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=120)

    # nobody waited for it: the others trained on through the cut
    for d in (logs[0], logs[2]):
        during = [
            m for m in jsonl(d / "metrics.jsonl") if "step" in m and cut_at <= m["time"] <= cut_at + CUT_S
        ]
        gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(during)]
        waited = during[-1]["sync_wait_s"] - during[0]["sync_wait_s"]
        print(
            f"  {d.name} during the cut: {len(during)} steps, longest gap {max(gaps):.1f} s, waited {waited:.1f} s"
        )
        assert len(during) >= 10 and max(gaps) < 20.0 and waited < 0.3 * CUT_S, d.name
    # and no shard was lost: every epoch the run completed was read whole
    reads = [r for d in logs for r in jsonl(d / "shards.jsonl")]
    completed = max(r["epoch"] for r in reads) - 1  # the last two epochs may be open
    lost = 0
    for epoch in range(completed):
        missing = {f"train-{i:06d}.tar" for i in range(SHARDS)} - {
            r["shard"] for r in reads if r["epoch"] == epoch
        }
        lost += len(missing)
    print(
        f"  {completed} epochs completed, {lost} shards lost, peer 1 restored at +{restored_at - cut_at:.0f} s"
    )
    fault.once(lost)
    assert completed >= 1 and lost == 0
