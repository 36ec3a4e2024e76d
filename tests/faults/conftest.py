"""The fault-injection suite: options, seeded random fault points, and the per-case results file.

    --fault-runs N      repetitions of the repeated cases (kill at random points, peers killed in a loop);
                        small by default so that the plain `pytest` run stays quick, 20 in `make faults`
    --fault-seed S      seed of every random fault point (default: from the clock, printed), to replay a run
    --fault-report P    write each case's outcome (runs, failures, data lost) as JSON to P, which
                        `python -m tests.faults.report P` turns into RELIABILITY.md's table

Every test here is marked `faults`. A test gets a `fault` fixture: it names its case, counts runs and the
data it lost (0 is the only passing value), and runs repeated bodies with `fault.repeat`, which gives each
run its own seeded `random.Random` and keeps going after a failed run so the report counts failures.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

DEFAULT_RUNS = 3


def pytest_addoption(parser):
    group = parser.getgroup("faults", "fault-injection suite (tests/faults)")
    group.addoption(
        "--fault-runs", type=int, default=None, help=f"repetitions of repeated cases [{DEFAULT_RUNS}]"
    )
    group.addoption("--fault-seed", type=int, default=None, help="seed of the random fault points [clock]")
    group.addoption("--fault-report", default=None, metavar="PATH", help="write case outcomes as JSON here")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"fault_report_{report.when}", report)
    return report


@dataclass
class Outcome:
    """One case's result, as it goes into the report."""

    case: str
    group: str
    lost_means: str
    test: str
    seed: int
    nodeid: str = ""
    runs: int = 0
    failures: int = 0
    lost: int = 0
    seconds: float = 0.0
    status: str = "passed"
    errors: list[str] = field(default_factory=list)


class Fault:
    """What a fault test reports: its case, its runs, the data it lost, and its failures.

    >>> def test_x(fault):
    ...     fault.case("build", "kill -9 at random points", lost_means="shards that differ from a clean build")
    ...     fault.repeat(lambda run, rng: one_run(rng))   # each run returns the units of data it lost
    """

    def __init__(self, test: str, seed: int, default_runs: int):
        self.seed = seed
        self.default_runs = default_runs
        self.outcome = Outcome(case=test, group="", lost_means="", test=test, seed=seed)

    def case(self, group: str, case: str, *, lost_means: str) -> Fault:
        self.outcome.group, self.outcome.case, self.outcome.lost_means = group, case, lost_means
        return self

    def rng(self, run: int = 0) -> random.Random:
        """The seeded random source of one run of this case (the same for the same --fault-seed)."""
        return random.Random(f"{self.seed}/{self.outcome.test}/{run}")

    def once(self, lost: int = 0) -> None:
        """Count one run that lost `lost` units of data (asserting afterwards is up to the test)."""
        self.outcome.runs += 1
        self.outcome.lost += lost

    def repeat(self, body: Callable[[int, random.Random], int | None], runs: int | None = None) -> None:
        """Run `body(run, rng)` `runs` times (default --fault-runs); it returns the data it lost.

        A run that raises counts as a failure and the loop goes on; at the end the test fails with every
        run's error and the seed that replays it.
        """
        for run in range(runs if runs is not None else self.default_runs):
            rng = self.rng(run)
            print(f"[{self.outcome.test}] run {run}: --fault-seed {self.seed}", flush=True)
            self.outcome.runs += 1
            try:
                lost = body(run, rng) or 0
            except Exception as e:
                self.outcome.failures += 1
                where = traceback.extract_tb(e.__traceback__)[-1]
                self.outcome.errors.append(
                    f"run {run} (--fault-seed {self.seed}): {type(e).__name__}: {e} "
                    f"[{Path(where.filename).name}:{where.lineno}]"
                )
                continue
            self.outcome.lost += lost
        if self.outcome.errors:
            pytest.fail(
                f"{len(self.outcome.errors)} of {self.outcome.runs} runs failed:\n"
                + "\n".join(self.outcome.errors)
            )
        assert self.outcome.lost == 0, f"data lost: {self.outcome.lost} ({self.outcome.lost_means})"


@pytest.fixture(scope="session")
def fault_seed(request) -> int:
    seed = request.config.getoption("--fault-seed", None)
    return int(seed) if seed is not None else int(time.time()) % 1_000_000


@pytest.fixture(scope="session")
def fault_runs(request) -> int:
    runs = request.config.getoption("--fault-runs", None)
    return max(1, int(runs)) if runs is not None else DEFAULT_RUNS


@pytest.fixture(scope="session")
def _fault_outcomes(request, fault_seed, fault_runs):
    outcomes: list[Outcome] = []
    yield outcomes
    path = request.config.getoption("--fault-report", None)
    if path and outcomes:
        report = {
            "seed": fault_seed,
            "fault_runs": fault_runs,
            "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cases": [asdict(o) for o in outcomes],
        }
        Path(path).write_text(json.dumps(report, indent=1) + "\n")


@pytest.fixture
def fault(request, fault_seed, fault_runs, _fault_outcomes):
    """The current test's `Fault` (see the class); its outcome goes to --fault-report."""
    handle = Fault(request.node.name, fault_seed, fault_runs)
    handle.outcome.nodeid = request.node.nodeid
    print(f"[{request.node.name}] replay with --fault-seed {fault_seed}", flush=True)
    started = time.monotonic()
    yield handle
    outcome = handle.outcome
    outcome.seconds = round(time.monotonic() - started, 1)
    call = getattr(request.node, "fault_report_call", None)
    if call is not None and call.failed:
        outcome.status = "failed"
        outcome.runs = max(outcome.runs, 1)
        outcome.failures = max(outcome.failures, 1)
        if not outcome.errors:
            outcome.errors.append(str(call.longrepr).strip().splitlines()[-1][:500])
    elif call is not None and call.skipped:
        outcome.status = "skipped"
    _fault_outcomes.append(outcome)
