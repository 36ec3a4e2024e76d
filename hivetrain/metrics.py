"""Training metrics: JSON-lines logs, running rates, and the signed record each peer publishes to the DHT.

`JsonLines` flushes every line as it is written, so a crashed or killed peer leaves a complete log up to
its last step, and `tail -f` shows the run live. `MetricsPublisher` writes a small `MetricsRecord` under
the run's `<run_id>_metrics` key every few seconds, signed with the peer's key; `hivetrain monitor`
reads them. The schema (`MetricsRecords`) is installed in every peer's DHT (`make_dht(schemas=...)`),
so records of another shape are refused by the DHT itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import hivemind
from hivemind.dht.schema import BytesWithPublicKey
from hivemind.utils import get_dht_time
from pydantic.v1 import BaseModel, Field, StrictBool, confloat, conint, constr

from .dht import ensure_run_validators
from .leases import shard_list_fingerprint

logger = logging.getLogger(__name__)


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


# ---- the signed metrics record each peer publishes to the run's DHT ---------------------------------

_Text = constr(strict=True, max_length=128)
_Count = conint(strict=True, ge=0)
_Real = confloat(strict=True, allow_inf_nan=False)
_NonNegative = confloat(strict=True, ge=0, allow_inf_nan=False)
_Fraction = confloat(strict=True, ge=0, le=1, allow_inf_nan=False)

MAX_RECORD_BYTES = 4096
"""A metrics record is a few hundred bytes; anything near this size is refused as oversized."""


def _measure(default: Any, gauge: str, description: str) -> Any:
    """A field of the record that monitors show per peer and export as the Prometheus gauge `gauge`."""
    return Field(default, description=description, gauge=gauge)


class MetricsRecord(BaseModel):
    """What one peer reports about itself, rewritten every few seconds (numbers: None when unknown).

    `time` is the DHT time of the write and `every` the publishing interval: a monitor treats a peer
    whose record is several intervals old as gone. `stopped` is set by the last record of a peer that
    leaves cleanly. `shard_count` and `shard_fp` (`hivetrain.leases.shard_list_fingerprint`) let a
    monitor read the run's shard leases without the manifest. The fields made with `_measure` are the
    peer's measurements: this class is the one list of them (`MEASURES`) that the publisher, the
    monitor's table and its Prometheus gauges read.
    """

    peer: constr(strict=True, max_length=64)
    name: _Text
    address: constr(strict=True, max_length=256)
    device: _Text
    time: _Real
    every: _NonNegative
    stopped: StrictBool
    sync: constr(strict=True, max_length=32) = ""
    uptime: _NonNegative = _measure(
        0.0, "hivetrain_peer_uptime_seconds", "Seconds since one peer started publishing."
    )
    samples: _Count = _measure(0, "hivetrain_peer_samples", "Samples one peer has trained on.")
    samples_per_s: _NonNegative | None = _measure(
        None, "hivetrain_peer_samples_per_second", "Training samples per second of one peer."
    )
    loss: _Real | None = _measure(None, "hivetrain_peer_loss", "Training loss of one peer's last step.")
    lr: _Real | None = _measure(None, "hivetrain_peer_learning_rate", "Learning rate of one peer.")
    global_step: _Count = _measure(0, "hivetrain_peer_global_step", "Global step one peer is at.")
    data_epoch: conint(strict=True, ge=-1) = _measure(
        -1, "hivetrain_peer_data_epoch", "Data epoch one peer reads."
    )
    shards_read: _Count = _measure(0, "hivetrain_peer_shards_read", "Shards one peer has read.")
    shards_claimed: _Count = _measure(
        0, "hivetrain_peer_shards_claimed", "Shards one peer holds under lease."
    )
    data_wait_frac: _Fraction | None = _measure(
        None, "hivetrain_peer_data_wait_ratio", "Fraction of time one peer waits for data."
    )
    compute_frac: _Fraction | None = _measure(
        None, "hivetrain_peer_compute_ratio",
        "Fraction of one peer's training time spent computing (forward, backward, local optimizer step).",
    )  # fmt: skip
    sync_wait_frac: _Fraction | None = _measure(
        None,
        "hivetrain_peer_sync_wait_ratio",
        "Fraction of one peer's training time spent waiting on averaging.",
    )
    sent_per_s: _NonNegative | None = _measure(
        None, "hivetrain_peer_sent_bytes_per_second", "Bytes per second one peer's p2p daemon sends."
    )
    received_per_s: _NonNegative | None = _measure(
        None, "hivetrain_peer_received_bytes_per_second", "Bytes per second one peer's p2p daemon receives."
    )
    sent_per_sample: _NonNegative | None = _measure(
        None, "hivetrain_peer_sent_bytes_per_sample", "Bytes one peer has sent per sample it trained on."
    )
    fetch_mb_s: _NonNegative | None = _measure(
        None, "hivetrain_peer_fetch_megabytes_per_second", "Shard download rate of one peer (MB/s)."
    )
    val_top1: _Fraction | None = _measure(
        None, "hivetrain_peer_val_top1", "Last validation top-1 accuracy of one peer (0-1)."
    )
    val_top5: _Fraction | None = _measure(
        None, "hivetrain_peer_val_top5", "Last validation top-5 accuracy of one peer (0-1)."
    )
    shard_count: _Count
    shard_fp: constr(strict=True, max_length=32)


MEASURES: dict[str, Any] = {
    name: f for name, f in MetricsRecord.__fields__.items() if "gauge" in f.field_info.extra
}
"""The record's measurements, in order: name -> pydantic field (`.default`, `.field_info.description`,
`.field_info.extra["gauge"]`)."""


class MetricsRecords(BaseModel):
    """Key `<run_id>_metrics`: one `MetricsRecord` per peer under its `[owner:...]` subkey.

    Pass it to `hivetrain.dht.make_dht(schemas=[MetricsRecords])` so that the DHT refuses records of
    another shape or larger than `MAX_RECORD_BYTES`, whoever sends them.
    """

    max_record_bytes: ClassVar[int] = MAX_RECORD_BYTES
    metrics: dict[BytesWithPublicKey, MetricsRecord]


def metrics_key(run_id: str) -> str:
    """The DHT key of a run's metrics records."""
    return f"{run_id}_metrics"


_INTS = {name for name, f in MEASURES.items() if issubclass(f.type_, int)}
_FLOATS = {name for name, f in MEASURES.items() if issubclass(f.type_, float)} - {"uptime"}
_BOUNDS = {
    name: (getattr(MEASURES[name].type_, "ge", None), getattr(MEASURES[name].type_, "le", None))
    for name in _FLOATS
}
"""Each float measurement's (low, high) bounds in the schema: values are clipped into them before sending."""


def describe_device(device: Any) -> str:
    """A device for people: `cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`."""
    text = str(device)
    if text.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            text = f"{text} ({torch.cuda.get_device_name(torch.device(text))})"
    return text[:128]


class MetricsPublisher:
    """Publishes this peer's `MetricsRecord` to the DHT every `interval_s` from a background thread.

    `update(**fields)` only stores the latest values (it never blocks training on the DHT); fields that
    are not part of the record (a step's `time`, `data_wait`, ...) are ignored, so a whole metrics line
    can be passed. The record is signed (its subkey is this peer's `[owner:...]` key) and expires after
    `ttl_s`, so a peer that dies fades out of monitors; `close()` publishes a last record marked
    `stopped`.

    Args:
        dht: a running DHT of the run (`make_dht(run_id=..., schemas=[MetricsRecords])`).
        run_id: the run's name (the record's key is `<run_id>_metrics`).
        peer_name: a human name for this peer (host name); shown by monitors as text.
        address: the multiaddr others reach this peer at ("" in client mode).
        device: the training device (`describe_device`).
        shards: the training split's shard names in manifest order, for the shard count and fingerprint.
        sync: the peer's synchronisation mode (`--sync`), shown by monitors.
        interval_s: seconds between writes.
        ttl_s: a record's lifetime in the DHT (default: four intervals, at least 20 s).
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        *,
        peer_name: str,
        address: str,
        device: str,
        shards: Sequence[str] = (),
        sync: str = "",
        interval_s: float = 5.0,
        ttl_s: float | None = None,
        request_timeout_s: float = 10.0,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._dht, self._key = dht, metrics_key(run_id)
        self._interval_s, self._timeout_s = interval_s, request_timeout_s
        self._ttl_s = ttl_s if ttl_s is not None else max(4 * interval_s, 20.0)
        self._subkey = ensure_run_validators(dht, run_id)
        self._started = time.monotonic()
        self._fields: dict[str, Any] = dict(
            {name: f.default for name, f in MEASURES.items() if name in _INTS | _FLOATS},
            peer=dht.peer_id.to_base58()[:64], name=str(peer_name)[:128], address=str(address)[:256],
            device=str(device)[:128], every=float(interval_s), sync=str(sync)[:32], shard_count=len(shards),
            shard_fp=shard_list_fingerprint(shards) if shards else "",
        )  # fmt: skip
        self._lock = threading.Lock()
        self._expiration = 0.0
        self._closed, self._wake = threading.Event(), threading.Event()
        self.published = 0
        self._thread = threading.Thread(target=self._loop, name=f"MetricsPublisher({run_id})", daemon=True)
        self._thread.start()

    def update(self, **fields: Any) -> None:
        """Take the latest values of the record's fields (others are ignored); returns at once."""
        clean = {}
        for name, value in fields.items():
            if name in _INTS and value is not None:
                clean[name] = int(value)
            elif name in _FLOATS:
                clean[name] = _finite(float(value)) if value is not None else None
        with self._lock:
            self._fields.update(clean)

    def record(self, *, stopped: bool = False) -> dict[str, Any]:
        """The record as it would be published now."""
        with self._lock:
            fields = dict(self._fields)
        for name, (low, high) in _BOUNDS.items():
            if low is not None:
                fields[name] = _clip(fields[name], low, high)
        return dict(fields, time=get_dht_time(), uptime=time.monotonic() - self._started, stopped=stopped)

    def close(self) -> None:
        """Stop the thread and publish a last record marked `stopped`. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._thread.join()
        self._publish(stopped=True)

    def __enter__(self) -> MetricsPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while not self._closed.is_set():
            self._publish()
            self._wake.wait(self._interval_s)

    def _publish(self, *, stopped: bool = False) -> bool:
        record = self.record(stopped=stopped)
        # for one subkey the later expiration wins: keep them increasing
        self._expiration = max(get_dht_time() + self._ttl_s, self._expiration + 1e-3)
        try:
            future = self._dht.store(
                self._key, record, self._expiration, subkey=self._subkey, return_future=True
            )
            stored = future.result(timeout=self._timeout_s)
        except Exception as e:  # a stopped or unreachable DHT: metrics are not worth failing for
            logger.debug("metrics record not published: %r", e)
            return False
        if stored:
            self.published += 1
        else:
            logger.debug("metrics record not stored: %s", record)
        return bool(stored)


def _clip(value: float | None, low: float, high: float | None) -> float | None:
    if value is None:
        return None
    return float(max(low, value) if high is None else min(max(low, value), high))
