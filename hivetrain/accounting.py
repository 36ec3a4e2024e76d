"""Where a peer's time goes and what it costs the network: the figures of `metrics.jsonl`, the DHT
metrics record and the monitor.

    compute_s, compute_frac   forward, backward and local optimizer steps: seconds, and their share of
                     the wall time since training began
    sync_wait_s, sync_wait_frac   time the training loop waited on averaging (a round, a state download)
    data_wait_frac   time it waited for the next batch (over the steps' time, as before)
    sent_bytes, received_bytes, sent_per_s, received_per_s, sent_per_sample, received_per_sample
                     the p2p daemon's measured traffic (`hivetrain.traffic`), per second over the last
                     `window_s` and per sample trained since the start

Pure: the caller passes times and counters, so the arithmetic is tested on its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .traffic import Traffic


@dataclass
class Accounting:
    """Running totals of one peer's training. `started` is the monotonic time training began."""

    started: float
    window_s: float = 30.0
    compute_s: float = 0.0
    samples: int = 0
    _traffic: deque = field(default_factory=deque, repr=False)

    def step(self, *, compute_s: float, samples: int) -> None:
        """One local step: `compute_s` seconds of computing (waits on averaging excluded)."""
        self.compute_s += max(0.0, compute_s)
        self.samples += samples

    def fields(self, *, now: float, sync_wait_s: float, traffic: Traffic | None) -> dict[str, Any]:
        """The figures as of `now` (monotonic)."""
        wall = max(1e-9, now - self.started)
        out: dict[str, Any] = dict(
            compute_s=self.compute_s, sync_wait_s=sync_wait_s,
            compute_frac=min(1.0, self.compute_s / wall), sync_wait_frac=min(1.0, sync_wait_s / wall),
            sent_bytes=None, received_bytes=None, sent_per_s=None, received_per_s=None,
            sent_per_sample=None, received_per_sample=None,
        )  # fmt: skip
        if traffic is None:
            return out
        self._traffic.append((now, traffic))
        while len(self._traffic) > 2 and self._traffic[1][0] < now - self.window_s:
            self._traffic.popleft()
        first_t, first = self._traffic[0]
        span = now - first_t
        out.update(sent_bytes=traffic.sent, received_bytes=traffic.received)
        if span > 0:
            out.update(
                sent_per_s=(traffic.sent - first.sent) / span,
                received_per_s=(traffic.received - first.received) / span,
            )
        if self.samples:
            out.update(
                sent_per_sample=traffic.sent / self.samples,
                received_per_sample=traffic.received / self.samples,
            )
        return out
