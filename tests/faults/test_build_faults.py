"""`shardtool build` under faults: kill -9 at random points, a disk that fills, sources that change or vanish.

Every case runs the installed `shardtool` in a subprocess and kills it, starves it of space or changes its
input with real signals, a real size-limited tmpfs mount (or a kernel-enforced file size limit where
mounting is refused) and real file operations.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardtool.build import BuildOptions, _order
from shardtool.manifest import load
from shardtool.sources import open_source
from tests import datagen
from tests.faults.helpers import bad_finals, samples_by_source, shard_map, temp_files, wait_group_gone
from tests.util import BIN, cli, wait_until


@dataclass
class Reference:
    """A dataset tree, the build command for it, and an uninterrupted build of it."""

    src: Path
    args: list
    out: Path
    seconds: float
    shards: dict
    manifest: bytes


def reference_build(root: Path, src: Path, *args) -> Reference:
    out = root / "reference"
    command = ["build", src, *args]
    started = time.monotonic()
    cli("shardtool", *command, "--out", out, check=True)
    seconds = time.monotonic() - started
    return Reference(src, command, out, seconds, shard_map(out), (out / "manifest.json").read_bytes())


def differences(out: Path, ref: Reference) -> int:
    """Shards (and the manifest) of `out` that differ from the reference build, plus extra shard files."""
    if not (out / "manifest.json").exists():
        return len(ref.shards) + 1
    got = shard_map(out)
    lost = sum(got.get(name) != shard for name, shard in ref.shards.items())
    lost += len({p.name for p in out.glob("*.tar")} - set(ref.shards))
    return lost + ((out / "manifest.json").read_bytes() != ref.manifest)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Reference:
    """An ILSVRC-layout tree with awkward files; one sample per shard, so a build writes ~165 shards."""
    root = tmp_path_factory.mktemp("build-faults")
    content = datagen.imagenet_content(num_classes=3, per_class=50, val_images=15)
    datagen.imagenet_tree(root / "src", content)
    return reference_build(root, root / "src", "--workers", "2", "--max-per-shard", "1")


# ---- kill -9 at random points -------------------------------------------------------------------


def test_kill_9_at_random_points_then_rerun_converges(imagenet, tmp_path, children, fault):
    fault.case(
        "build",
        "kill -9 at random points (main process or whole group, 1-2 kills), then rerun",
        lost_means="shards or manifest differing from an uninterrupted build, or a bad file under a final name",
    )
    ref = imagenet

    def run(k: int, rng: random.Random) -> int:
        out = tmp_path / f"run{k}"
        lost = 0
        for _ in range(rng.randint(1, 2)):
            delay = rng.uniform(0.0, 1.2 * ref.seconds)
            whole_group = rng.random() < 0.5
            proc = children.start(
                BIN / "shardtool", *ref.args, "--out", out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            try:
                proc.wait(timeout=delay)
                print(f"  finished before the kill at {delay:.2f} s")
            except subprocess.TimeoutExpired:
                (os.killpg if whole_group else os.kill)(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                print(f"  killed {'the group' if whole_group else 'the main process'} at {delay:.2f} s")
            proc.stderr.close()
            wait_group_gone(proc.pid)  # the build's workers notice and go
            # nothing that looks finished is incomplete
            bad = bad_finals(out, ref.shards) if out.exists() else []
            lost += len(bad)
            assert not bad, f"after a kill at {delay:.2f} s: {bad} under final names do not verify"
            if (out / "manifest.json").exists():
                assert (out / "manifest.json").read_bytes() == ref.manifest, "a manifest before the end"
        rerun = cli("shardtool", *ref.args, "--out", out)
        assert rerun.returncode == 0, rerun.stderr
        lost += differences(out, ref)
        assert not temp_files(out), temp_files(out)
        shutil.rmtree(out)
        return lost

    fault.repeat(run)


# ---- a disk that fills ---------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A real size-limited file system (tmpfs) at `path`; skips the test where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield lambda new_size: subprocess.run(
            ["mount", "-o", f"remount,size={new_size}", str(path)], check=True, capture_output=True
        )
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _limit_file_size(limit: int):
    def apply():
        # The kernel refuses writes past `limit` bytes in any one file (EFBIG) once SIGXFSZ is ignored.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("how", ["tmpfs", "rlimit-fsize"])
def test_disk_full_is_one_clear_error_and_a_rerun_with_space_converges(imagenet, tmp_path, fault, how):
    fault.case(
        "build",
        f"disk fills during the build ({'a full tmpfs: ENOSPC' if how == 'tmpfs' else 'RLIMIT_FSIZE: EFBIG'})",
        lost_means="a bad file under a final name, or shards differing from a clean build after the rerun",
    )
    ref = imagenet
    total = sum(p.stat().st_size for p in ref.out.rglob("*") if p.is_file())
    rng = fault.rng()
    with contextlib.ExitStack() as stack:
        if how == "tmpfs":
            out = tmp_path / "small" / "out"
            grow = stack.enter_context(tmpfs(tmp_path / "small", int(total * rng.uniform(0.3, 0.8))))
            proc = cli("shardtool", *ref.args, "--out", out)
        else:
            out = tmp_path / "out"
            proc = cli(
                "shardtool",
                *ref.args,
                "--max-per-shard",
                "6",
                "--out",
                out,
                preexec_fn=_limit_file_size(20_000),
            )
        lines = proc.stderr.strip().splitlines()
        print(proc.stderr[-2000:])
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        reason = "No space left on device" if how == "tmpfs" else "File too large"
        assert lines[-1].startswith(f"Error: {out}: cannot write ({reason})"), lines[-1]
        assert "run the same command again" in lines[-1]
        assert not temp_files(out), temp_files(out)
        assert not (out / "manifest.json").exists()
        if how == "tmpfs":
            bad = bad_finals(out, ref.shards)
            assert not bad, bad
            grow(2 * total + (1 << 20))  # space freed
            rerun = cli("shardtool", *ref.args, "--out", out)
            assert rerun.returncode == 0, rerun.stderr
            assert "kept from before" in rerun.stderr
            lost = differences(out, ref)
        else:
            rerun = cli("shardtool", *ref.args, "--max-per-shard", "6", "--out", out)  # no limit now
            assert rerun.returncode == 0, rerun.stderr
            clean = tmp_path / "clean"
            cli("shardtool", *ref.args, "--max-per-shard", "6", "--out", clean, check=True)
            lost = sum(a != b for a, b in zip(shard_map(out).items(), shard_map(clean).items()))
            lost += (out / "manifest.json").read_bytes() != (clean / "manifest.json").read_bytes()
        assert not temp_files(out)
    fault.once(lost)
    assert lost == 0


# ---- source files that change or vanish during the build ----------------------------------------


def test_sources_changing_or_vanishing_mid_build(tmp_path, children, fault):
    """Files deleted, overwritten with garbage of the same size, or replaced by another image while the
    build runs: after the build's workers checked them and before the packer reads them again."""
    fault.case(
        "build",
        "source files deleted / overwritten (same size) / replaced while the build runs",
        lost_means="images neither stored with their bytes at read time nor listed as skipped; "
        "stored bytes that were never checked",
    )
    rng = fault.rng()
    src = tmp_path / "src"
    originals = {}
    for c in range(3):
        for i in range(100):
            data = datagen.jpeg(c * 1000 + i, (48, 36))
            (src / f"c{c}").mkdir(parents=True, exist_ok=True)
            (src / f"c{c}" / f"{i:04d}.jpg").write_bytes(data)
            originals[f"c{c}/{i:04d}.jpg"] = data
    args = ["build", src, "--workers", "2", "--max-per-shard", "1"]
    # the order the build packs records in, to change files the workers have checked but the packer has
    # not read yet: the packer is paused as its first shard begins, the workers check on meanwhile
    source = open_source(src)
    order = [r.source for r in _order(source.listing("train").records, "train", BuildOptions())]
    targets = rng.sample(order[40:200], 30)
    deleted, garbage, replaced = targets[:10], targets[10:20], targets[20:]

    out = tmp_path / "out"
    proc = children.start(
        BIN / "shardtool", *args, "--out", out, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_until(
        lambda: (out.is_dir() and any(out.glob(".train-*.tmp"))) or proc.poll() is not None,
        interval=0.001,
        what="the first shard",
    )
    os.kill(proc.pid, signal.SIGSTOP)  # the packer only: its workers check on
    try:
        new = {}
        for name in deleted:
            (src / name).unlink()
        for name in garbage:
            (src / name).write_bytes(random.Random(name).randbytes(len(originals[name])))
        for k, name in enumerate(replaced):
            new[name] = datagen.jpeg(50_000 + k, (64, 40))
            tmp = src / f".{k}.tmp"
            tmp.write_bytes(new[name])
            os.replace(tmp, src / name)  # the way sync tools replace files
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    stderr = stderr.decode()
    print(stderr[-3000:])
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr

    manifest = load(out / "manifest.json")
    skipped = {s["path"]: s["reason"] for s in manifest.skipped}
    stored = samples_by_source(out)
    lost = 0
    before = 0  # targets the packer had read before they changed: stored as they were, which is right
    for name, data in originals.items():
        if name in targets and stored.get(name) == data:
            before += 1
            continue
        if name in deleted or name in garbage:
            ok = name in skipped and name not in stored
        elif name in replaced:
            ok = stored.get(name) == new[name]
        else:
            ok = stored.get(name) == data
        if not ok:
            lost += 1
            print(f"LOST {name}: stored={name in stored} skipped={skipped.get(name)}")
    caught = stderr.count("changed since a worker checked it") + stderr.count("since it was checked")
    print(f"{len(targets)} files changed: {before} read before the change, {caught} caught after their check")
    fault.once(lost)
    assert lost == 0
    assert not temp_files(out)

    # the input changed, so the same command refuses to mix it with this build; --overwrite rebuilds,
    # identical to a clean build of the tree as it is now
    again = cli("shardtool", *args, "--out", out)
    assert again.returncode == 1 and "holds a build of different input" in again.stderr.splitlines()[-1]
    cli("shardtool", *args, "--out", out, "--overwrite", check=True)
    clean = tmp_path / "clean"
    cli("shardtool", *args, "--out", clean, check=True)
    assert shard_map(out) == shard_map(clean)
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
