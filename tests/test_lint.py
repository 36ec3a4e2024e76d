"""The code base stays ruff-clean (lint rules in pyproject.toml)."""

import subprocess

from tests.util import BIN, REPO


def test_ruff_check():
    proc = subprocess.run(
        [str(BIN / "ruff"), "check", "--no-cache", str(REPO)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format():
    proc = subprocess.run(
        [str(BIN / "ruff"), "format", "--check", "--no-cache", str(REPO)], capture_output=True, text=True
    )
    assert proc.returncode == 0, "run `ruff format .`:\n" + proc.stdout + proc.stderr
