"""The run as the DHT shows it: peers' metrics records, the current epoch's shards, a bounded history.

`RunMonitor` polls the run's keys every `poll_s` from a background thread: `<run_id>_metrics` (one
`MetricsRecord` per peer) and the shard keys of `hivetrain.assign` (the last epoch marked complete, and
every bucket of the two epochs after it: leases and done lists), and turns them into one JSON-ready snapshot (`state()`) for the web page, the
Prometheus exporter and TensorBoard. It only reads.

Peers are keyed by their signing key (the record's `[owner:...]` subkey). A peer is `live` while its
record is younger than three of its publishing intervals, `stale` after that (it stopped publishing:
crashed, or cut off), `left` once it published its last record on a clean exit, and forgotten
`forget_s` after its last record. The DHT refuses records of the wrong shape; what it refused, and
what passed the schema but makes no sense (a record from the future, leases for other shards), is
counted by reason in `refused`.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import statistics
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

from ..dht import bucket_key
from ..leases import (
    WINDOW,
    Board,
    Done,
    bucket_count,
    current_epoch,
    parse_records,
    shard_list_fingerprint,
    shard_states,
)
from ..metrics import MAX_RECORD_BYTES, MEASURES, MetricsRecord, metrics_key
from . import refusals

logger = logging.getLogger(__name__)

STALE_INTERVALS = 3
"""A peer whose record is older than this many of its publishing intervals (plus `grace_s`) is stale."""

PEER_FIELDS = (*MEASURES, "sync")
"""What the table shows of each peer's record (besides its name, address and state)."""
HISTORY_FIELDS = ("samples_per_s", "loss", "val_top1", "val_top5", "global_step", "peers")


@dataclass(frozen=True)
class MonitorOptions:
    """How often the monitor reads the DHT and how much it remembers.

    Attributes:
        poll_s: seconds between reads of the run's records.
        grace_s: slack beyond `STALE_INTERVALS` publishing intervals before a peer counts as stale.
        forget_s: a peer whose last record is this old leaves the table.
        history: points of the aggregate curves kept; when full, every other point is dropped, so the
            curves always span the whole run at a coarser resolution.
        max_peers: peers remembered at most (the oldest records go first).
        future_s: a record stamped further than this in the future is refused as malformed.
        request_timeout_s: a DHT read slower than this counts as failed.
    """

    poll_s: float = 2.0
    grace_s: float = 5.0
    forget_s: float = 600.0
    history: int = 2000
    max_peers: int = 1000
    future_s: float = 60.0
    request_timeout_s: float = 10.0


class History:
    """Aggregate points over time, bounded: when full it halves its resolution instead of forgetting.

    Written here because a ring buffer (`deque(maxlen=...)`) would drop the start of a long run, and
    the start is where the loss curve says the most.
    """

    def __init__(self, capacity: int):
        if capacity < 2:
            raise ValueError(f"history capacity must be at least 2, got {capacity}")
        self.capacity = capacity
        self._points: list[dict[str, Any]] = []

    def append(self, point: dict[str, Any]) -> None:
        if len(self._points) >= self.capacity:
            self._points = self._points[::2]
        self._points.append(point)

    def columns(self) -> dict[str, list]:
        """`{"t": [...], field: [...]}`: one list per field, the layout the page's charts want."""
        keys = ("t", *HISTORY_FIELDS)
        return {key: [p.get(key) for p in self._points] for key in keys}

    def __len__(self) -> int:
        return len(self._points)


@dataclass
class _Seen:
    record: MetricsRecord
    key: str  # a short, stable id of the signing key


class RunMonitor:
    """Reads a run's records from the DHT every `poll_s` and keeps the snapshot the server shows.

    Args:
        dht: a running DHT joined to the run (client mode is enough); the monitor installs a counter of
            refused records on it (`refusals.install`).
        run_id: the run's name.
        shard_lists: known shard lists (e.g. each split of the manifest), to name the shards in the grid;
            the list the peers announce (by fingerprint) is used. Without it shards are shown by index.
        options: polling and memory (`MonitorOptions`).
        listeners: called with each new history point (e.g. `TensorBoardWriter`), from the poll thread.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        *,
        run_id: str,
        shard_lists: Sequence[Sequence[str]] = (),
        options: MonitorOptions = MonitorOptions(),
        listeners: Sequence[Callable[[dict[str, Any]], None]] = (),
    ):
        self.dht, self.run_id, self.options = dht, run_id, options
        self._names = {shard_list_fingerprint(names): list(names) for names in shard_lists if names}
        self._default_names = list(shard_lists[0]) if shard_lists else None
        self._listeners = list(listeners)
        self._peers: dict[bytes, _Seen] = {}
        self._history = History(options.history)
        self._bad: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self._bad_counts = dict.fromkeys(refusals.REASONS, 0)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._dht_error: str | None = None
        self._state: dict[str, Any] = {}
        self.polls = 0
        refusals.install(dht, sizes={metrics_key(run_id): MAX_RECORD_BYTES})
        self.poll()
        self._thread = threading.Thread(target=self._loop, name=f"RunMonitor({run_id})", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The latest snapshot (a fresh dict each poll; do not modify it)."""
        with self._lock:
            return self._state

    def poll(self) -> dict[str, Any]:
        """Read the DHT now and rebuild the snapshot (the background thread calls this every `poll_s`)."""
        now = get_dht_time()
        metrics, error = self._get(metrics_key(self.run_id)), None
        if isinstance(metrics, Exception):
            metrics, error = None, metrics
        else:
            self._take_metrics(metrics, now)
        peers = self._peer_rows(now)
        epoch = None
        if error is None:
            epoch = self._epoch(now, peers)
            if isinstance(epoch, Exception):
                epoch, error = None, epoch
        self._set_error(error)
        epoch = self.state().get("epoch") if error is not None else epoch
        totals = self._totals(peers, epoch)
        point = dict(t=now, **{key: totals.get(key) for key in HISTORY_FIELDS})
        self._history.append(point)
        try:
            refused = refusals.counts(self.dht)
        except Exception:  # the DHT process is gone: the last counts stand
            refused = self.state().get("refused", dict.fromkeys(refusals.REASONS, 0))
        refused = {reason: refused.get(reason, 0) + self._bad_counts[reason] for reason in refusals.REASONS}
        state = dict(
            run_id=self.run_id, now=now, poll_s=self.options.poll_s, dht_error=self._dht_error,
            totals=totals, peers=peers, epoch=epoch, history=self._history.columns(), refused=refused,
        )  # fmt: skip
        with self._lock:
            self._state = state
            self.polls += 1
        for listener in self._listeners:
            try:
                listener(point)
            except Exception as e:
                logger.warning("%r failed on a history point: %s", listener, e)
        return state

    def close(self) -> None:
        """Stop polling (the DHT stays up: it belongs to the caller)."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> RunMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed.wait(self.options.poll_s):
            try:
                self.poll()
            except Exception:  # keep serving the last snapshot; say why once per poll
                logger.exception("monitor poll failed")

    def _get(self, key: str):
        try:
            future = self.dht.get(key, latest=True, return_future=True)
            return future.result(timeout=self.options.request_timeout_s)
        except Exception as e:
            return e

    def _set_error(self, error: Exception | None) -> None:
        text = None if error is None else f"{type(error).__name__}: {error}".strip()
        if text != self._dht_error:
            if text is None:
                logger.info("run %s: the DHT answers again", self.run_id)
            else:
                logger.warning("run %s: cannot read the DHT (%s)", self.run_id, text)
        self._dht_error = text

    def _refuse(self, reason: str, *identity) -> None:
        """Count a record refused here (after the DHT's own checks), once per distinct record."""
        if identity in self._bad:
            return
        self._bad[identity] = None
        if len(self._bad) > 4096:
            self._bad.popitem(last=False)
        self._bad_counts[reason] += 1
        logger.debug("run %s: refused a %s record from %r", self.run_id, reason, identity[0][:48])

    def _take_metrics(self, value, now: float) -> None:
        entries = value.value.items() if value is not None and isinstance(value.value, dict) else ()
        for owner, item in entries:
            try:
                record = MetricsRecord.parse_obj(item.value)
            except Exception:  # the DHT's schema makes this rare: a node without our validators
                self._refuse("malformed", owner, item.expiration_time)
                continue
            if record.time > now + self.options.future_s:
                self._refuse("malformed", owner, record.time)
                continue
            seen = self._peers.get(owner)
            if seen is None or record.time >= seen.record.time:
                self._peers[owner] = _Seen(record, hashlib.sha256(owner).hexdigest()[:12])
        for owner in [o for o, s in self._peers.items() if now - s.record.time > self.options.forget_s]:
            del self._peers[owner]
        if len(self._peers) > self.options.max_peers:
            by_age = sorted(self._peers, key=lambda o: self._peers[o].record.time)
            for owner in by_age[: len(self._peers) - self.options.max_peers]:
                del self._peers[owner]

    # ---- building the snapshot --------------------------------------------------------------------

    def _peer_rows(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for seen in self._peers.values():
            r = seen.record
            age = max(0.0, now - r.time)
            if r.stopped:
                status = "left"
            elif age > STALE_INTERVALS * r.every + self.options.grace_s:
                status = "stale"
            else:
                status = "live"
            row = dict(id=seen.key, peer=r.peer, name=r.name, address=r.address, device=r.device)
            row.update(state=status, age_s=round(age, 1), **{f: getattr(r, f) for f in PEER_FIELDS})
            row.update(shard_count=r.shard_count, shard_fp=r.shard_fp)
            rows.append(row)
        order = {"live": 0, "stale": 1, "left": 2}
        rows.sort(key=lambda row: (order[row["state"]], row["name"], row["peer"]))
        return rows

    def _shard_list(self, peers: list[dict[str, Any]]) -> tuple[str, int, list[str] | None] | None:
        """The shard list the run's peers announce (most of the live ones), with names when known."""
        votes = collections.Counter(
            (p["shard_fp"], p["shard_count"]) for p in peers if p["state"] != "left" and p["shard_count"] > 0
        )
        if not votes:
            votes = collections.Counter((p["shard_fp"], p["shard_count"]) for p in peers if p["shard_count"])
        if votes:
            (fp, n), _ = votes.most_common(1)[0]
            names = self._names.get(fp)
            return fp, n, names if names is not None and len(names) == n else None
        if self._default_names:
            return shard_list_fingerprint(self._default_names), len(self._default_names), self._default_names
        return None

    def _epoch(self, now: float, peers: list[dict[str, Any]]) -> dict[str, Any] | Exception | None:
        """The current epoch's shards: state (done, claimed, backup: claimed by a second reader as a
        straggler, free) and holder of each, in manifest order (an Exception: the DHT did not answer)."""
        shard_list = self._shard_list(peers)
        if shard_list is None:
            return None
        fp, n, names = shard_list
        marks = self._get(f"{self.run_id}_shards_epochs")
        if isinstance(marks, Exception):
            return marks
        entries = marks.value.items() if marks is not None and isinstance(marks.value, dict) else ()
        floor = max([-1, *(x.value.get("complete", -1) for _, x in entries if _is_mark(x.value, fp))])
        epochs = range(floor + 1, floor + 1 + WINDOW)
        keys = [bucket_key(self.run_id, e, b) for e in epochs for b in range(bucket_count(n))]
        futures = [self.dht.get(key, latest=True, return_future=True) for key in keys]
        leases, dones = [], [Done(b"", "", floor, {})]
        for future in futures:
            try:
                value = future.result(timeout=self.options.request_timeout_s)
            except Exception as e:
                return e
            found, finished, bad = parse_records(value, n=n, fp=fp, now=now)
            leases += found
            dones += finished
            entries = value.value if value is not None and isinstance(value.value, dict) else {}
            for owner, expiration in bad:
                item = entries.get(owner)
                other_list = item is not None and isinstance(item.value, dict) and item.value.get("fp") != fp
                if not other_list:  # peers of another shard list under the same run id are not at fault
                    self._refuse("malformed", owner, expiration)
        board = Board(n, now, tuple(leases), tuple(dones))
        epoch = current_epoch(board)
        names_by_peer = {p["peer"]: p["name"] for p in peers}
        states, holders = (list(column) for column in zip(*shard_states(board, epoch), strict=True))
        counts = collections.Counter(states)
        return dict(
            epoch=epoch, count=n, fp=fp, names=names, states=states, holders=holders,
            holder_names={h: names_by_peer[h] for h in set(holders) if h in names_by_peer},
            done=counts["done"], claimed=counts["claimed"], backup=counts["backup"], free=counts["free"],
        )  # fmt: skip

    @staticmethod
    def _totals(peers: list[dict[str, Any]], epoch: dict[str, Any] | None) -> dict[str, Any]:
        live = [p for p in peers if p["state"] == "live"]
        losses = [p["loss"] for p in live if p["loss"] is not None]
        ahead = max(peers, key=lambda p: (p["global_step"], p["state"] == "live"), default=None)
        validated = [p for p in peers if p["val_top1"] is not None]
        best = max(validated, key=lambda p: p["global_step"], default=None)
        return dict(
            peers=len(live),
            stale=sum(p["state"] == "stale" for p in peers),
            left=sum(p["state"] == "left" for p in peers),
            samples_per_s=sum(p["samples_per_s"] or 0.0 for p in live),
            samples=sum(p["samples"] for p in peers),
            loss=statistics.fmean(losses) if losses else None,
            lr=ahead["lr"] if ahead is not None else None,
            global_step=ahead["global_step"] if ahead is not None else None,
            data_epoch=epoch["epoch"] if epoch is not None else None,
            val_top1=best["val_top1"] if best is not None else None,
            val_top5=best["val_top5"] if best is not None else None,
        )


def shard_lists_of(manifest) -> list[list[str]]:
    """Each split's shard names (train first): the lists a monitor can name its shard grid from."""
    splits: Mapping[str, Any] = manifest.splits
    order = sorted(splits, key=lambda name: name != "train")
    return [[shard.name for shard in splits[name].shards] for name in order]


def _is_mark(value, fp: str) -> bool:
    """Whether a record under `<run_id>_shards_epochs` is an epoch mark for the shard list `fp`."""
    return isinstance(value, dict) and value.get("fp") == fp and isinstance(value.get("complete"), int)
