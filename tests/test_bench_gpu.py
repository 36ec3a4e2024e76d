"""bench/gpu.py: the GPU benchmark's table from a real `--smoke` run (on a CPU in CI: the GPU rows must say
they were skipped, and `--decode gpu` must fall back to PIL with hivetrain's warning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.util import REPO

SCRIPT = REPO / "bench" / "gpu.py"
CUDA = torch.cuda.is_available()


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed markdown table: row name -> its other cells."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "measurement":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_smoke_run_measures_every_row(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = table_rows(proc.stdout)
    results = json.loads((out / "results.json").read_text())["rows"]
    assert list(results) == ["ceiling", "cpu", "gpu", "pil1", "pil", "nvjpeg"]
    assert list(printed) == [r["name"] for r in results.values()]
    assert results["pil"]["name"].endswith(f"PIL, {os.cpu_count()} processes")

    measured = ["ceiling", "cpu", "gpu", "pil1", "pil"] + (["nvjpeg"] if CUDA else [])
    for key in measured:
        rate, ratio, wait, util, _notes = printed[results[key]["name"]]
        assert float(rate) > 0, (key, rate)
        base = results[key]["base"]
        if base is not None:  # the ratio printed is this row's rate over its base's
            value, label = ratio.split(" x ")
            assert float(value) == pytest.approx(results[key]["rate"] / results[base]["rate"], abs=0.006)
            assert label == results[base]["short"]
        if key in ("cpu", "gpu"):
            assert 0 <= float(wait.rstrip("%")) <= 100
            assert util.endswith("%") if CUDA else util == "n/a", util
            metrics = (out / f"peer-{key}-metrics.jsonl").read_text().splitlines()
            assert len(metrics) > 2 and all('"data_wait"' in line for line in metrics[:2])

    assert results["cpu"]["base"] == results["gpu"]["base"] == "ceiling"
    assert results["pil"]["base"] == "pil1" and results["nvjpeg"]["base"] == "pil"
    if not CUDA:
        assert printed[results["nvjpeg"]["name"]][0] == "skipped: no CUDA"
        assert "fell back to PIL, as hivetrain warned" in results["gpu"]["note"]
        assert (
            "decode='gpu' asked for, but CUDA is not available" in (out / "peer-gpu-stderr.log").read_text()
        )


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_full_run_without_cuda_is_refused_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "bench/gpu.py: no CUDA device here (the full sizes need a GPU); --smoke runs tiny sizes on a CPU"
    ]
    assert list(tmp_path.iterdir()) == []  # refused before generating anything
