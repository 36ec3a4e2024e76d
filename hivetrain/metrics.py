"""Training metrics: one JSON object per line in `<log-dir>/metrics.jsonl`, and running rates.

The lines are flushed as they are written, so a crashed or killed peer leaves a complete log up to its
last step, and `tail -f` shows the run live.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any


class JsonLines:
    """Append-only JSON-lines file, safe to write from several threads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _finite(v) for k, v in record.items()}, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Rate:
    """Samples per second over a sliding time window (robust to the pauses of averaging rounds)."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self._events: list[tuple[float, int]] = []

    def add(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._events.append((now, count))
        cutoff = now - self.window_s
        while len(self._events) > 2 and self._events[0][0] < cutoff:
            self._events.pop(0)

    @property
    def per_second(self) -> float:
        if len(self._events) < 2:
            return 0.0
        span = self._events[-1][0] - self._events[0][0]
        return sum(c for _, c in self._events[1:]) / span if span > 0 else 0.0
