"""RELIABILITY.md's table comes from the suite's JSON report; the prose around it is kept."""

from __future__ import annotations

import pytest

from tests.faults.report import END, START, update

REPORT = {
    "seed": 7, "fault_runs": 20, "machine": "box: 2 CPUs", "python": "3.11.7", "finished": "2026-11-26 03:00:00",
    "cases": [
        dict(case="kill | rerun", group="build", lost_means="shards that differ", test="test_b", nodeid="t.py::test_b",
             seed=7, runs=20, failures=0, lost=0, seconds=60.0, status="passed", errors=[]),
        dict(case="bad pieces", group="fetch", lost_means="corrupt shards kept", test="test_f", nodeid="t.py::test_f[x]",
             seed=7, runs=1, failures=1, lost=2, seconds=6.0, status="failed", errors=["boom"]),
    ],
}  # fmt: skip


def test_table_replaces_only_the_marked_part():
    before = f"# Reliability\n\nprose\n\n{START}\nold table\n{END}\n\nmore prose\n"
    after = update(before, REPORT)
    assert after.startswith("# Reliability\n\nprose\n\n") and after.endswith(f"{END}\n\nmore prose\n")
    assert "old table" not in after
    assert "| build | kill \\| rerun | 20 | 0 | 0 | shards that differ |" in after
    assert "| fetch | bad pieces (failed) | 1 | 1 | 2 |" in after
    assert "`pytest 't.py::test_f[x]' --fault-runs 20 --fault-seed 7`" in after
    assert "**21 runs, 1 failures, 2 units of data lost.** Failing: test_f." in after
    assert update(after, REPORT) == after  # idempotent


def test_missing_markers_are_an_error():
    with pytest.raises(SystemExit, match="markers"):
        update("# Reliability\n", REPORT)
