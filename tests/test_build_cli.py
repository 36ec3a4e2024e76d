"""`shardtool build` through the real command line: workers, interruption and resume, user errors.

Interruptions and the main user errors run the installed `shardtool` in a subprocess; further error cases
go through click's runner in-process (the same command group and error handling, without the start-up).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess

import pytest
from click.testing import CliRunner

from shardtool.build import BuildOptions, _order, build
from shardtool.cli import cli as cli_group
from shardtool.manifest import load
from shardtool.sources import open_source
from shardtool.verify import verify_shard
from tests import datagen
from tests.util import BIN, cli, wait_until


def shard_hashes(out):
    return [(s.name, s.sha256) for _, s in load(out / "manifest.json").shards()]


def test_workers_do_not_change_a_byte(tmp_path):
    datagen.imagenet_tree(tmp_path / "src")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        proc = cli(
            "shardtool",
            "build",
            tmp_path / "src",
            "--out",
            out,
            "--workers",
            workers,
            "--shard-size",
            "8KB",
            check=True,
        )
        assert (
            "train: 15 samples" in proc.stderr and "3 converted" in proc.stderr and "3 skipped" in proc.stderr
        )
        assert proc.stdout.strip() == str(out / "manifest.json")
        outs.append(out)
    assert shard_hashes(outs[0]) == shard_hashes(outs[1])
    assert len(shard_hashes(outs[0])) > 4
    assert len({(o / "manifest.json").read_bytes() for o in outs}) == 1


def _tree_for_interrupting(tmp_path):
    content = datagen.imagenet_content(num_classes=3, per_class=50, val_images=15)
    datagen.imagenet_tree(tmp_path / "src", content)
    # one sample per shard: hundreds of fsynced shards, so the build runs long enough to be interrupted
    return ["build", tmp_path / "src", "--workers", "2", "--max-per-shard", "1"]


def _interrupt(children, tmp_path, args, out, sig):
    proc = children.start(
        BIN / "shardtool", *args, "--out", out, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_until(
        lambda: len(list(out.glob("train-*.tar"))) >= 5 or proc.poll() is not None,
        timeout=60,
        what="the first shards",
    )
    if proc.poll() is not None:
        pytest.fail("the build finished before it could be interrupted")
    if sig == signal.SIGKILL:
        os.kill(proc.pid, sig)  # only the main process: its workers must notice and go
    else:
        os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole foreground process group
    _, stderr = proc.communicate(timeout=30)  # reads while waiting: a full pipe must not block the build
    wait_until(lambda: not _group_alive(proc.pid), timeout=20, what="the build's worker processes to exit")
    return proc.returncode, stderr.decode()


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_build_resumes_to_identical_output(tmp_path, children, sig):
    args = _tree_for_interrupting(tmp_path)
    reference = tmp_path / "reference"
    cli("shardtool", *args, "--out", reference, check=True)
    expected = dict(shard_hashes(reference))

    out = tmp_path / "out"
    code, stderr = _interrupt(children, tmp_path, args, out, sig)
    if sig == signal.SIGINT:
        assert code == 130 and "interrupted" in stderr
        assert not list(out.glob(".*.tmp")), "Ctrl-C left temp files"
    else:
        assert code == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    finished = sorted(out.glob("*.tar"))
    assert finished and len(finished) < len(expected)
    for path in finished:  # nothing that looks finished is incomplete
        manifest_shard = next(s for _, s in load(reference / "manifest.json").shards() if s.name == path.name)
        assert verify_shard(path, manifest_shard) is None, path

    rerun = cli("shardtool", *args, "--out", out, check=True)
    assert "kept from before" in rerun.stderr
    assert dict(shard_hashes(out)) == expected
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert not list(out.glob(".*.tmp"))


def test_resume_rewrites_a_damaged_shard(tmp_path, caplog):
    datagen.tiny_imagenet(tmp_path / "src")
    out = tmp_path / "out"
    options = BuildOptions(shard_size=6_000, workers=0)
    build(tmp_path / "src", out, options, progress=False)
    expected = shard_hashes(out)
    victim = out / expected[1][0]
    victim.write_bytes(victim.read_bytes()[:-10])
    report = build(tmp_path / "src", out, options, progress=False)
    assert f"{victim}: size" in caplog.text and "writing it again" in caplog.text
    assert report.splits[0].resumed_shards == 1
    assert shard_hashes(out) == expected


def _error(*args) -> str:
    """Run `shardtool` as a user would; it must fail with one line (and no traceback). Returns that line."""
    proc = cli("shardtool", *args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _error_in_process(*args) -> str:
    """The same through click's runner in this process (the same group and error handling, no start-up cost)."""
    result = CliRunner().invoke(cli_group, [str(a) for a in args])
    assert (result.exit_code == 1 and result.exception is None) or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_user_errors_are_one_line(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    line = _error("build", tmp_path / "junk", "--out", tmp_path / "o1")
    assert f"{tmp_path / 'junk'}: no known dataset layout found; expected ILSVRC2012" in line

    datagen.imagenet_tree(tmp_path / "nolabels", val_labels="none")
    line = _error("build", tmp_path / "nolabels", "--out", tmp_path / "o3")
    assert f"{tmp_path / 'nolabels'}: val images are not in class folders and no labels were found" in line
    assert "--val-labels" in line

    datagen.tiny_imagenet(tmp_path / "tiny")
    annotations = tmp_path / "tiny" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn07777777\t0\t0\t1\t1\n")
    line = _error("build", tmp_path / "tiny", "--out", tmp_path / "o5", "--split", "val")
    assert f"{annotations} line 7: unknown wnid 'n07777777' (not in wnids.txt)" in line

    for p in (tmp_path / "tiny" / "test" / "images").iterdir():
        p.unlink()
    line = _error("build", tmp_path / "tiny", "--out", tmp_path / "o6", "--split", "test")
    assert f"{tmp_path / 'tiny' / 'test' / 'images'}: split 'test' has no images" in line


def test_strict_makes_a_bad_file_fatal(tmp_path):
    datagen.tiny_imagenet(tmp_path / "tiny")
    out = tmp_path / "out"
    proc = cli("shardtool", "build", tmp_path / "tiny", "--out", out, "--split", "train", "--strict")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith("Error: train/n0") and errors[0].endswith("(--strict)")
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))


def test_strict_prints_no_traceback(tmp_path):
    datagen.tiny_imagenet(tmp_path / "tiny")
    proc = cli(
        "shardtool", "build", tmp_path / "tiny", "--out", tmp_path / "o", "--split", "train", "--strict"
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_ctrl_c_prints_no_traceback(tmp_path, children):
    content = datagen.imagenet_content(num_classes=2, per_class=150, val_images=0, awkward_files=False)
    for files in content.train.values():  # CMYK: every image is re-encoded, its new bytes sent back
        files[:] = [(name, datagen.awkward("cmyk", i), "cmyk") for i, (name, _, _) in enumerate(files)]
    datagen.imagenet_tree(tmp_path / "src", content)
    # A fifo in place of the 100th image in build order: its check blocks until Ctrl-C, so the build is
    # still running, with a shard being written, when the signal comes, however fast this machine is.
    order = _order(open_source(tmp_path / "src").listing("train").records, "train", BuildOptions())
    blocking = tmp_path / "src" / order[100].source
    blocking.unlink()
    os.mkfifo(blocking)
    out = tmp_path / "out"
    proc = children.start(
        BIN / "shardtool",
        "build",
        tmp_path / "src",
        "--out",
        out,
        "--workers",
        "1",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_until(lambda: list(out.glob(".train-*.tmp")) or proc.poll() is not None, timeout=60, what="a shard")
    assert proc.poll() is None, "the build finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # a shard is being written
    _, stderr = proc.communicate(timeout=30)
    assert (
        proc.returncode == 130
        and "Traceback" not in stderr.decode()
        and "Exception ignored" not in stderr.decode()
    )


def test_more_user_errors(tmp_path):
    assert "not a folder" in _error_in_process("build", tmp_path / "missing", "--out", tmp_path / "o")

    datagen.imagenet_tree(tmp_path / "nolabels", val_labels="none")
    labels = tmp_path / "labels.txt"
    labels.write_text("n01440764\nn09999999\n" * 10)
    line = _error_in_process("build", tmp_path / "nolabels", "--out", tmp_path / "o", "--val-labels", labels)
    assert f"{labels}: unknown wnid 'n09999999' for val/ILSVRC2012_val_00000002.JPEG" in line
    labels.write_text("n01440764\n")
    line = _error_in_process("build", tmp_path / "nolabels", "--out", tmp_path / "o", "--val-labels", labels)
    assert f"{labels}: no label for val/ILSVRC2012_val_00000002.JPEG" in line

    datagen.tiny_imagenet(tmp_path / "tiny")
    line = _error_in_process("build", tmp_path / "tiny", "--out", tmp_path / "o", "--split", "extra")
    assert "no split 'extra' in this tiny-imagenet dataset (it has: train, val, test)" in line
    line = _error_in_process("build", tmp_path / "tiny", "--out", tmp_path / "o", "--shard-size", "lots")
    assert "cannot read size 'lots'" in line

    (tmp_path / "tiny" / "val" / "val_annotations.txt").unlink()
    line = _error_in_process("build", tmp_path / "tiny", "--out", tmp_path / "o")
    assert f"{tmp_path / 'tiny' / 'val' / 'val_annotations.txt'}: missing (it holds the val labels)" in line


def test_a_different_build_into_the_same_folder_is_refused(tmp_path):
    datagen.tiny_imagenet(tmp_path / "src", awkward_files=False)
    out = tmp_path / "out"
    build(tmp_path / "src", out, BuildOptions(workers=0), progress=False)
    line = _error_in_process("build", tmp_path / "src", "--out", out, "--seed", "7", "--workers", "0")
    assert f"{out}: holds a build of different input or options" in line and "--overwrite" in line
    result = CliRunner().invoke(
        cli_group,
        ["build", str(tmp_path / "src"), "--out", str(out), "--seed", "7", "--overwrite", "--workers", "0"],
    )
    assert result.exit_code == 0, result.stderr
    assert load(out).build["seed"] == 7

    other = tmp_path / "other"
    other.mkdir()
    (other / "train-000000.tar").write_bytes(b"not ours")
    line = _error_in_process("build", tmp_path / "src", "--out", other)
    assert "already holds shards or a manifest that this build did not write" in line
    assert (other / "train-000000.tar").read_bytes() == b"not ours"


def test_cifar_pickles_cannot_run_code(tmp_path):
    datagen.cifar10(tmp_path / "src", per_batch=2, test=2)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    line = _error_in_process("build", tmp_path / "src", "--out", tmp_path / "out")
    assert "data_batch_3: not a CIFAR-10 python batch (refusing to load posix.system)" in line
    assert not (tmp_path / "pwned").exists()
