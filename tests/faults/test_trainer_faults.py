"""The trainer under faults: SIGKILL while a checkpoint is being written, and a poisoned batch (NaN loss)
in a real two-peer run.

"Data lost" here is training the user would lose: a `latest` checkpoint that no longer loads, or a model
whose weights went non-finite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hivetrain import checkpoint
from tests.test_train import finish, jsonl, maddr, peer_args, served, start_peer  # noqa: F401 (fixture)
from tests.util import REPO, wait_until

IDENTITY = checkpoint.Identity("synthetic", "f" * 64, "resnet18", 10, 32)

# Saves checkpoints of a real ResNet-18 (with SGD momentum buffers, ~90 MB a save) back to back; save k
# fills every weight with k, so a loaded checkpoint can be checked whole. Prints k once save k is in place.
SAVER = """
import sys
from pathlib import Path
import torch, torchvision
from hivetrain import checkpoint
folder = Path(sys.argv[1])
identity = checkpoint.Identity("synthetic", "f" * 64, "resnet18", 10, 32)
removed = checkpoint.remove_stale_temps(folder)
print("removed", len(removed), flush=True)
model = torchvision.models.resnet18(num_classes=10)
start = int(sys.argv[2])
for k in range(start, start + 10_000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(k)
    momentum = {name: p.detach().clone() for name, p in model.named_parameters()}
    checkpoint.save(folder / checkpoint.LATEST, identity=identity,
                    state=dict(model=model.state_dict(), optimizer=momentum, global_step=k))
    print(k, flush=True)
"""


def _finite(state: dict) -> bool:
    return all(
        torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t) and t.is_floating_point()
    )


def test_sigkill_during_checkpoint_save_leaves_the_previous_checkpoint(tmp_path, fault):
    fault.case(
        "trainer",
        "SIGKILL at a random point of back-to-back checkpoint saves (ResNet-18 + momentum, ~90 MB each)",
        lost_means="kills after which `latest.pt` did not load, or held anything but the newest finished save, whole",
    )
    folder = tmp_path / "ck"
    mid_write, removed = 0, {}

    def run(k: int, rng) -> int:
        nonlocal mid_write
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(folder), str(1000 * (k + 1))],
            cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            removed[k] = int(proc.stdout.readline().split()[1])  # what the kill before left behind
            done = [int(proc.stdout.readline())]  # the first save is in place
            time.sleep(rng.uniform(0.0, 1.5))  # the random point
            writing = any(folder.glob(".latest.pt.*.tmp"))
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        done += [int(x) for x in proc.stdout.read().split()]
        mid_write += writing
        try:
            saved = checkpoint.load(folder, expect=IDENTITY)
        except checkpoint.CheckpointError as e:
            print(f"  run {k}: {e}")
            return 1
        step = saved["global_step"]
        # the last save it reported, or the next one if the kill fell between the rename and the print
        weights = [saved["model"][name] for name in saved["optimizer"]]  # the parameters, not BN buffers
        whole = step in (done[-1], done[-1] + 1) and all(
            bool((t == step).all()) for t in (*weights, *saved["optimizer"].values())
        )
        print(f"  run {k}: killed after {len(done)} save(s), {'mid-write' if writing else 'between writes'}; "
              f"latest holds save {step}")  # fmt: skip
        return 0 if whole else 1

    fault.repeat(run)
    # the next start removes what the killed saves left behind
    leftovers = sorted(p.name for p in folder.glob(".latest.pt.*.tmp"))
    assert sorted(checkpoint.remove_stale_temps(folder)) == leftovers
    assert not list(folder.glob(".*.tmp"))
    print(f"{mid_write} of {fault.outcome.runs} kills landed while a save was being written; "
          f"unfinished saves removed at the next start: {sum(removed.values()) + len(leftovers)}")  # fmt: skip
    assert mid_write >= 1 or fault.outcome.runs < 10, "no kill landed mid-write: the case tested nothing"


@pytest.mark.slow
def test_nan_loss_from_a_poisoned_batch_is_skipped_not_averaged(served, tmp_path, children, fault):  # noqa: F811
    fault.case(
        "trainer",
        "poisoned batches (NaN pixels) on one of two peers training together",
        lost_means="peers whose weights or optimizer state went non-finite, or whose val accuracy fell to chance",
    )
    a, b = tmp_path / "poisoned", tmp_path / "clean"
    poison = [2, 3, 5]
    a.mkdir()
    out = open(a / "stdout.txt", "w")  # noqa: SIM115 (closed with the process)
    args = peer_args(served, a, "--max-steps", "8", "--checkpoint-dir", a / "ck")[2:]
    pa = children.start(
        sys.executable, "-m", "tests.faults.poisoned_peer", "run", *args, cwd=REPO, stdout=out, stderr=out,
        env={**os.environ, "HIVETRAIN_POISON_STEPS": ",".join(map(str, poison)), "HIVETRAIN_START_FILE": str(tmp_path / "go")},
    )  # fmt: skip
    pb = start_peer(
        children, served, b, "--max-steps", "8", "--checkpoint-dir", b / "ck", "--initial-peer", maddr(a)
    )
    # the poisoned peer waits at its first step until the clean one trains too, or it might finish alone
    wait_until(
        lambda: "training testset on" in (b / "stdout.txt").read_text(), timeout=120, what="the clean peer"
    )
    (tmp_path / "go").touch()
    out_a = finish(pa, a)
    finish(pb, b)

    assert out_a.count("poisoning local step") == len(poison), out_a[-2000:]
    assert out_a.count("non-finite loss (nan): skipping this batch") == len(poison), out_a[-2000:]
    assert f"{len(poison)} batches skipped (non-finite loss)" in out_a
    metrics = {d: [m for m in jsonl(d / "metrics.jsonl") if "loss" in m] for d in (a, b)}
    assert metrics[a][-1]["skipped_steps"] == len(poison)
    assert max(m["peers"] for m in metrics[a]) == 2, "the peers never trained together"
    assert all(m["loss"] is not None for m in metrics[b]), "the clean peer saw a non-finite loss"
    lost = 0
    for d in (a, b):
        saved = checkpoint.load(d / "ck")
        finite = _finite(saved["model"]) and _finite(_flatten(saved["optimizer"]))
        top1 = float((d / "stdout.txt").read_text().rsplit("val top-1 ", 1)[1].split("%")[0])
        print(f"  {d.name}: weights finite {finite}, val top-1 {top1:.1f}%")
        lost += not finite or top1 <= 40.0  # 4 classes: chance is 25%
    fault.once(lost)
    assert lost == 0
    wait_until(lambda: pa.poll() is not None and pb.poll() is not None, what="both peers to exit")


def _flatten(state, prefix="") -> dict:
    """Every tensor in a nested optimizer state, by path."""
    if torch.is_tensor(state):
        return {prefix: state}
    items = (
        state.items()
        if isinstance(state, dict)
        else enumerate(state)
        if isinstance(state, list | tuple)
        else ()
    )
    out = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}/{key}"))
    return out
