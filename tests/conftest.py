from __future__ import annotations

import os

import pytest

# Many peers share this machine's few cores in the tests: one compute thread each (else each starts a
# thread per core and they contend; four two-thread peers on two cores step 5x slower than one-thread ones).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.util import Children


@pytest.fixture
def children():
    """Background processes that are killed (whole process group) when the test ends."""
    group = Children()
    yield group
    group.kill_all()
