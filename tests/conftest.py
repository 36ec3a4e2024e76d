from __future__ import annotations

import pytest

from tests.util import Children


@pytest.fixture
def children():
    """Background processes that are killed (whole process group) when the test ends."""
    group = Children()
    yield group
    group.kill_all()
