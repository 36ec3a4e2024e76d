"""hivetrain run: recipes and checkpoints (fast), and real peers training together on loopback (slow)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from hivetrain import checkpoint, recipe
from hivetrain.errors import CheckpointError, HivetrainError
from hivetrain.leases import Position
from shardtool.transport.serve import ShardServer
from tests.shardset import make_shard_set
from tests.util import BIN, cli, wait_until

# ---- recipes, schedule, checkpoints ------------------------------------------------------------


def test_schedule_warms_up_then_decays_to_zero():
    factors = [recipe.lr_factor(s, warmup=4, total=20) for s in range(21)]
    assert factors[:5] == sorted(factors[:5]) and factors[3] < 1.0
    assert factors[4] == pytest.approx(1.0)
    assert factors[4:] == sorted(factors[4:], reverse=True)
    assert factors[20] == pytest.approx(0.0)


def test_recipes_by_dataset(tmp_path):
    m = make_shard_set(tmp_path, {"train": (1, 2)})
    r = recipe.training_recipe(m, image_size=32)
    assert (r.model, r.image_size) == ("resnet18", 32)
    assert r.peak_lr == pytest.approx(0.1 * r.target_global_bsz / 256)
    m.dataset = "imagenet-1k"
    m.classes = m.classes * 250
    assert recipe.training_recipe(m).model == "resnet50"
    with pytest.raises(HivetrainError, match="at least --batch"):
        recipe.training_recipe(m, batch=128, target_global_bsz=64)
    m.classes = m.classes[:10]
    with pytest.raises(HivetrainError, match="should have 1000 classes"):
        recipe.training_recipe(m)


def test_small_stem_keeps_resolution_and_bn_buffers_are_found():
    r = recipe.TrainingRecipe("resnet18", 32)
    model = recipe.build_model(r, 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert len(recipe.batchnorm_buffers(model)) == 2 * 20  # 20 BatchNorm layers in a ResNet-18
    groups = recipe.param_groups(model, 5e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(p.ndim == 1 for p in groups[1]["params"])


def test_peers_of_a_run_start_from_the_same_weights_and_other_randomness_is_untouched():
    r = recipe.TrainingRecipe("resnet18", 32)
    torch.manual_seed(1)
    expected_draw = torch.rand(3)
    torch.manual_seed(1)
    a = recipe.build_model(r, 4, seed=7).state_dict()
    assert torch.equal(torch.rand(3), expected_draw)  # augmentations and shuffles draw as before
    b, other = recipe.build_model(r, 4, seed=7).state_dict(), recipe.build_model(r, 4, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], other["conv1.weight"])


@pytest.mark.parametrize(
    ("size", "stem", "last_map"), [(32, "cifar", 4), (48, "small", 3), (64, "small", 4), (224, "imagenet", 7)]
)
def test_model_stem_follows_the_training_resolution_for_any_dataset(tmp_path, size, stem, last_map):
    """A class-per-folder dataset (no recipe of its own) at 32 px gets the small-image stem, not
    ImageNet's, which would leave 1x1 feature maps; the last block always sees at least 3x3."""
    m = make_shard_set(tmp_path, {"train": (1, 2)})
    m.layout, m.dataset = "folder", "my-digits"
    r = recipe.training_recipe(m, image_size=size)
    assert r.stem == stem
    model = recipe.build_model(r, 10).eval()
    features = {}
    model.layer4.register_forward_hook(lambda module, args, out: features.update(out=out))
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 10)
    assert features["out"].shape[-2:] == (last_map, last_map)


@pytest.mark.parametrize(
    ("name", "kind", "lr"), [("sgd", "SGD", 0.25), ("lars", "Lars", 0.25), ("lamb", "Lamb", 0.004)]
)
def test_local_optimizers_follow_their_lr_rule_and_learn(name, kind, lr):
    assert recipe.TrainingRecipe(optimizer=name, target_global_bsz=640).peak_lr == pytest.approx(
        lr if name != "lamb" else 0.004 * math.sqrt(640 / 1024)
    )
    r = recipe.TrainingRecipe("resnet18", 16, optimizer=name, target_global_bsz=64)
    torch.manual_seed(0)
    model = recipe.build_model(r, 4)
    opt = recipe.optimizer(r)(recipe.param_groups(model, r.weight_decay))
    assert type(opt).__name__ == kind
    images, labels = torch.randn(32, 3, 16, 16), torch.arange(32) % 4
    images += labels[:, None, None, None]  # a learnable signal
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_round_trip_and_identity_checks(tmp_path):
    ident = checkpoint.Identity("cifar-10", "abc", "resnet18", 10, 32)
    checkpoint.save(tmp_path / "latest.pt", identity=ident, state={"global_step": 7})
    assert checkpoint.load(tmp_path, expect=ident)["global_step"] == 7
    other = checkpoint.Identity("cifar-10", "abc", "resnet50", 10, 32)
    with pytest.raises(CheckpointError, match="checkpoint is for model 'resnet18', this run has 'resnet50'"):
        checkpoint.load(tmp_path / "latest.pt", expect=other)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        checkpoint.load(tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "latest.pt"]  # no temp files left


def test_a_checkpoint_keeps_the_data_position_by_shard_name(tmp_path):
    names = [f"train-{i:06d}.tar" for i in range(6)]
    where = Position(4, {4: frozenset({0, 5}), 5: frozenset({2})})
    state = checkpoint.position_state(where, names)
    assert state == {
        "epoch": 4,
        "done": {"4": ["train-000000.tar", "train-000005.tar"], "5": ["train-000002.tar"]},
    }
    ident = checkpoint.Identity("cifar-10", "abc", "resnet18", 10, 32)
    checkpoint.save(tmp_path / "latest.pt", identity=ident, state={"data_position": state})
    assert checkpoint.saved_position(checkpoint.load(tmp_path), names, path="x") == where
    assert checkpoint.saved_position({"data_epoch": 3}, names, path="x") == Position(
        3, {}
    )  # older checkpoints
    assert checkpoint.saved_position({}, names, path="x") == Position(0, {})
    for damaged in ({"epoch": 4}, {"epoch": 4, "done": {"4": ["nope.tar"]}}, {"epoch": 4, "done": {"3": []}}):
        with pytest.raises(CheckpointError, match=r"ck\.pt: its data position is damaged"):
            checkpoint.saved_position({"data_position": damaged}, names, path="ck.pt")


# ---- the command line: user errors are one line -----------------------------------------------


def one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert all(f in lines[-1] for f in fragments), proc.stderr


def test_cli_errors(tmp_path):
    one_line_error(
        cli("hivetrain", "run", "--shards", tmp_path / "none.json"), "none.json", "no such manifest"
    )
    make_shard_set(tmp_path / "s", {"train": (1, 4), "val": (1, 4)})
    ident = checkpoint.Identity("other", "x", "resnet18", 4, 32)
    checkpoint.save(tmp_path / "ck" / "latest.pt", identity=ident, state={})
    base = ("hivetrain", "run", "--shards", tmp_path / "s", "--image-size", "32", "--log-dir", tmp_path / "l")
    one_line_error(
        cli(*base, "--resume-from", tmp_path / "ck"), "latest.pt", "checkpoint is for dataset 'other'"
    )
    one_line_error(cli(*base, "--initial-peer", "/ip4/127.0.0.1/tcp/1"), "not a full multiaddr")
    one_line_error(cli(*base, "--weights", tmp_path / "nope.pt"), "nope.pt", "no such weights file")


# ---- real peers --------------------------------------------------------------------------------

TRAIN = {"train": (16, 16), "val": (2, 32)}  # 256 training samples in 16 shards, 4 colour classes


def peer_args(url, log_dir, *extra):
    return [
        BIN / "hivetrain", "run", "--shards", url, "--run-id", "e2e", "--image-size", "32", "--batch", "16",
        "--target-global-bsz", "64", "--workers", "0", "--matchmaking-time", "2", "--averaging-timeout", "15",
        "--lease", "6", "--log-dir", log_dir, *extra,
    ]  # fmt: skip


def start_peer(children, url, log_dir: Path, *extra):
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "stdout.txt", "w")  # noqa: SIM115 (closed with the process)
    return children.start(*peer_args(url, log_dir, *extra), stdout=out, stderr=out)


def maddr(log_dir: Path) -> str:
    return wait_until(lambda: (log_dir / "maddrs.txt").exists() and (log_dir / "maddrs.txt").read_text().split(),
                      timeout=60, what="the first peer's address")[0]  # fmt: skip


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def finish(proc, log_dir: Path, timeout=300) -> str:
    proc.wait(timeout=timeout)
    text = (log_dir / "stdout.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture
def served(tmp_path):
    make_shard_set(tmp_path / "shards", TRAIN)
    with ShardServer(tmp_path / "shards") as server:
        yield server.url + "manifest.json"


SYNC_MODES = {
    "every-step": ("--sync", "every-step"),
    "diloco": ("--sync", "diloco", "--local-steps", "8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", SYNC_MODES)
def test_two_peers_share_epochs_and_learn(served, tmp_path, children, mode):
    a, b = tmp_path / "a", tmp_path / "b"
    sync = SYNC_MODES[mode]
    pa = start_peer(children, served, a, "--epochs", "4", "--checkpoint-dir", a / "ck", *sync)
    pb = start_peer(children, served, b, "--epochs", "4", "--initial-peer", maddr(a), *sync)
    out_a, out_b = finish(pa, a), finish(pb, b)
    steps = [jsonl(d / "metrics.jsonl")[-1]["global_step"] for d in (a, b)]
    assert steps == [math.ceil(4 * 256 / 64)] * 2, (out_a[-2000:], out_b[-2000:])  # both end at the last step
    for d in (a, b):  # accounting: time computing, bytes measured at the p2p daemon's sockets
        last = [m for m in jsonl(d / "metrics.jsonl") if "step" in m][-1]
        assert 0 < last["compute_frac"] <= 1 and 0 <= last["sync_wait_frac"] < 1, last
        assert last["sent_bytes"] > 0 and last["received_bytes"] > 0 and last["sent_per_sample"] > 0, last
    reads = jsonl(a / "shards.jsonl") + jsonl(b / "shards.jsonl")
    everything = [f"train-{i:06d}.tar" for i in range(16)]
    epochs = sorted({r["epoch"] for r in reads})
    shared = 0
    for epoch in epochs[:-2]:  # the last two may be cut short by the last global step (two are open at once)
        in_epoch = [r for r in reads if r["epoch"] == epoch]
        assert sorted({r["shard"] for r in in_epoch}) == everything, f"epoch {epoch}: every shard read"
        extra = len(in_epoch) - len(everything)  # a second reading only where a backup reader read it
        assert extra <= sum(bool(r.get("backup")) for r in in_epoch), f"epoch {epoch}: read twice unasked"
        shared += len({r["peer"] for r in in_epoch}) == 2
    assert shared >= 1, "in at least one whole epoch both peers read shards"
    final = [float(out.rsplit("val top-1 ", 1)[1].split("%")[0]) for out in (out_a, out_b)]
    for out, top1 in zip((out_a, out_b), final):
        assert top1 > 60.0, out[-2000:]  # 4 classes: chance is 25%
    if mode == "diloco":  # the last round is a plain average that lands on both: one model, one score
        assert final[0] == final[1], (out_a[-2000:], out_b[-2000:])
    assert (a / "ck" / "latest.pt").exists() and (a / "ck" / "best.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", SYNC_MODES)
def test_resume_continues_at_the_saved_step(served, tmp_path, children, mode):
    first, second = tmp_path / "first", tmp_path / "second"
    ck, sync = tmp_path / "ck", SYNC_MODES[mode]
    finish(start_peer(children, served, first, "--max-steps", "3", "--checkpoint-dir", ck, *sync), first)
    saved = checkpoint.load(ck)["global_step"]
    assert saved == 3
    out = finish(start_peer(children, served, second, "--max-steps", "5", "--resume-from", ck, *sync), second)
    assert "resumed from" in out and "at global step 3" in out
    metrics = jsonl(second / "metrics.jsonl")
    assert metrics[0]["global_step"] >= 3 and metrics[-1]["global_step"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("mode", SYNC_MODES)
def test_late_joiner_loads_state_a_killed_peer_loses_nothing_and_sigterm_stops_cleanly(
    served, tmp_path, children, mode
):
    a, b = tmp_path / "a", tmp_path / "b"
    sync = SYNC_MODES[mode]
    pa = start_peer(children, served, a, "--epochs", "100", "--checkpoint-dir", a / "ck", *sync)
    wait_until(lambda: any(m.get("global_step", 0) >= 3 for m in jsonl(a / "metrics.jsonl")), timeout=180,
               what="the first peer to reach global step 3")  # fmt: skip
    pb = start_peer(children, served, b, "--epochs", "100", "--initial-peer", maddr(a), *sync)
    wait_until(lambda: len(jsonl(b / "shards.jsonl")) >= 2, timeout=180, what="the joiner to read two shards")
    assert jsonl(b / "metrics.jsonl")[0]["global_step"] >= 3, "the joiner starts from the run's state"
    assert "downloading its state from peers" in (b / "stdout.txt").read_text()
    os.killpg(pb.pid, signal.SIGKILL)
    last_b = max(r["epoch"] for r in jsonl(b / "shards.jsonl"))

    def settled() -> bool:  # the killed peer's shards come back to the survivor once its lease lapses
        reads = jsonl(a / "shards.jsonl") + jsonl(b / "shards.jsonl")
        return all(len({r["shard"] for r in reads if r["epoch"] == e}) == 16 for e in range(last_b + 2))

    wait_until(settled, timeout=240, what="the survivor to finish every epoch up to the one after the kill")
    pa.send_signal(signal.SIGTERM)
    out = finish(pa, a, timeout=60)
    assert "SIGTERM: stopping" in out and "stopped at global step" in out
    assert (a / "ck" / "latest.pt").exists()
    reads = jsonl(a / "shards.jsonl") + jsonl(b / "shards.jsonl")
    everything = [f"train-{i:06d}.tar" for i in range(16)]
    extra = 0
    for epoch in range(last_b + 2):  # every epoch up to the one after the kill is complete
        shards = sorted(r["shard"] for r in reads if r["epoch"] == epoch)
        assert sorted(set(shards)) == everything, f"epoch {epoch}"
        extra += len(shards) - 16
    # Only shards in flight at the kill can be read twice (finished by the killed peer but not yet
    # announced): the shards it held, at most the read-ahead of its feed and loader.
    assert extra <= 6, extra


@pytest.mark.slow
def test_a_whole_run_killed_mid_epoch_resumes_its_data_where_the_checkpoint_has_it(
    served, tmp_path, children
):
    a, b, saved = tmp_path / "a", tmp_path / "b", tmp_path / "saved.pt"
    sync = SYNC_MODES["diloco"]
    pa = start_peer(children, served, a, "--epochs", "100", "--checkpoint-dir", a / "ck", "--checkpoint-every", "0.02",
                    *sync)  # fmt: skip
    pb = start_peer(children, served, b, "--epochs", "100", "--initial-peer", maddr(a), *sync)

    def mid_epoch() -> bool:  # a checkpoint of epoch 1 or later with some, not all, of its epoch done
        if not (a / "ck" / "latest.pt").exists():
            return False
        shutil.copyfile(a / "ck" / "latest.pt", saved)  # written by rename: a whole file, old or new
        where = checkpoint.saved_position(checkpoint.load(saved), everything, path=saved)
        return where.epoch >= 1 and 0 < len(where.done.get(where.epoch, ())) < 16

    everything = [f"train-{i:06d}.tar" for i in range(16)]
    wait_until(mid_epoch, timeout=240, interval=0.2, what="a checkpoint taken mid-epoch")
    for proc in (pa, pb):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    where = checkpoint.saved_position(checkpoint.load(saved), everything, path=saved)
    left = {
        e: sorted(set(everything) - {everything[i] for i in where.done.get(e, ())})
        for e in (where.epoch, where.epoch + 1)
    }

    a2, b2 = tmp_path / "a2", tmp_path / "b2"
    pa = start_peer(children, served, a2, "--epochs", "100", "--resume-from", saved, *sync)
    pb = start_peer(
        children, served, b2, "--epochs", "100", "--resume-from", saved, "--initial-peer", maddr(a2), *sync
    )
    reads = lambda: jsonl(a2 / "shards.jsonl") + jsonl(b2 / "shards.jsonl")  # noqa: E731
    wait_until(
        lambda: all(len({r["shard"] for r in reads() if r["epoch"] == e}) == len(left[e]) for e in left),
        timeout=240, what="the resumed run to finish its epoch and the next",
    )  # fmt: skip
    for proc in (pa, pb):
        proc.send_signal(signal.SIGTERM)
    out_a, out_b = finish(pa, a2, timeout=60), finish(pb, b2, timeout=60)
    assert f"resuming the data where the checkpoint has it, epoch {where.epoch}" in out_a, out_a[-3000:]
    assert "the run's data position stands, not the checkpoint's" in out_b, out_b[-3000:]
    after = reads()
    assert min(r["epoch"] for r in after) == where.epoch, "no earlier epoch is read again"
    for epoch, shards in left.items():  # the checkpoint's done shards are not read again, the others once
        got = [r for r in after if r["epoch"] == epoch]
        assert sorted({r["shard"] for r in got}) == shards, f"epoch {epoch}"
        assert len(got) - len(shards) <= sum(bool(r.get("backup")) for r in got), f"epoch {epoch}: read twice"
