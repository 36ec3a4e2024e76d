"""TensorBoard event files of the run's aggregate curves (`hivetrain monitor --tensorboard DIR`).

One scalar per history field under `run/` (samples/s of all live peers, mean loss, validation top-1 and
top-5, global step, live peers). The step axis counts seconds since the monitor started; the wall time
of each point is the DHT time it was read at, so TensorBoard's "wall" axis lines up with the peers' logs.
"""

from __future__ import annotations

import os
from typing import Any

from .aggregate import HISTORY_FIELDS


class TensorBoardWriter:
    """A RunMonitor listener that appends each history point to event files in `log_dir`."""

    def __init__(self, log_dir: str | os.PathLike, *, flush_s: float = 10.0):
        from torch.utils.tensorboard import SummaryWriter  # heavy: only when asked for

        self.log_dir = str(log_dir)
        self._writer = SummaryWriter(self.log_dir, flush_secs=flush_s)
        self._start: float | None = None

    def __call__(self, point: dict[str, Any]) -> None:
        if self._start is None:
            self._start = point["t"]
        step = int(point["t"] - self._start)
        for field in HISTORY_FIELDS:
            if point.get(field) is not None:
                self._writer.add_scalar(f"run/{field}", point[field], global_step=step, walltime=point["t"])

    def close(self) -> None:
        self._writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardWriter({self.log_dir!r})"
