"""Local shard copies for a training peer: verified once, fetched on demand, bounded in bytes.

A shard is looked for first beside the manifest (a folder the user built or fetched: used in place,
never evicted), then in the cache folder; otherwise it is fetched through `shardtool.transport`
(HTTP mirrors or the torrent, as the manifest offers), which verifies size and sha256 before the file
gets its final name and locks per shard across threads and processes, so concurrent workers never
download the same shard twice. Files found on disk are hashed once per process before first use.

The cache evicts least-recently-used shards that are not in use (pinned) once `limit_bytes` is passed.
Fetches run on a small thread pool so that the next claimed shards download while the current one is
read (`prefetch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shardtool.errors import FetchError
from shardtool.manifest import Manifest, Shard
from shardtool.transport import fetch_shard
from shardtool.verify import verify_shard

from .errors import DataError

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Counters for metrics: shards found locally, fetched (bytes, seconds), evicted, failed."""

    hits: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    fetch_seconds: float = 0.0
    evicted: int = 0
    failed: int = 0

    @property
    def fetch_mb_s(self) -> float:
        return self.fetched_bytes / 1e6 / self.fetch_seconds if self.fetch_seconds > 0 else 0.0


class ShardCache:
    """Verified local paths for a manifest's shards.

    Args:
        manifest: the shard set (local or loaded from a URL).
        directory: where fetched shards are kept.
        limit_bytes: evict unpinned shards beyond this many bytes in `directory` (None: no limit).
        mirrors: extra HTTP base URLs; via: "auto", "http" or "torrent"; peers: BitTorrent HOST:PORTs.
        fetch_threads: parallel fetches (prefetch depth).
    """

    def __init__(
        self,
        manifest: Manifest,
        directory: str | os.PathLike,
        *,
        limit_bytes: int | None = None,
        mirrors: tuple[str, ...] = (),
        via: str = "auto",
        peers: tuple[str, ...] = (),
        timeout: float = 30.0,
        fetch_threads: int = 2,
    ):
        self.manifest, self.directory = manifest, Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = limit_bytes
        self._fetch_args = dict(mirrors=mirrors, via=via, peers=peers, timeout=timeout)
        self._lock = threading.Lock()
        self._verified: set[Path] = set()
        self._pins: dict[str, int] = {}
        self._lru: OrderedDict[str, int] = OrderedDict()  # cached shard name -> size, oldest first
        self._pool = ThreadPoolExecutor(max_workers=max(1, fetch_threads), thread_name_prefix="shard-fetch")
        self._futures: dict[str, Future[Path]] = {}
        self.stats = CacheStats()
        for _, shard in manifest.shards():
            if (self.directory / shard.name).is_file():
                self._lru[shard.name] = shard.size

    # ---- public API -----------------------------------------------------------------------------

    def prefetch(self, shard: Shard) -> Future[Path]:
        """Start obtaining `shard` in the background and pin it; the future gives its local path."""
        with self._lock:
            self._pins[shard.name] = self._pins.get(shard.name, 0) + 1
            future = self._futures.get(shard.name)
            if future is None or (future.done() and future.exception() is not None):
                future = self._pool.submit(self._obtain, shard)
                self._futures[shard.name] = future
            return future

    def get(self, shard: Shard) -> Path:
        """The local, verified path of `shard` (pinned until `unpin`); fetches it if needed.

        Raises:
            FetchError: no source gave good bytes.
        """
        return self.prefetch(shard).result()

    def unpin(self, name: str) -> None:
        """The caller is done with shard `name`: it may be evicted from now on."""
        with self._lock:
            left = self._pins.get(name, 0) - 1
            if left > 0:
                self._pins[name] = left
            else:
                self._pins.pop(name, None)
                self._futures.pop(name, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals ------------------------------------------------------------------------------

    def _obtain(self, shard: Shard) -> Path:
        beside = self.manifest.base_dir
        if beside is not None and beside.resolve() != self.directory.resolve():
            path = beside / shard.name
            if self._check(path, shard):
                self.stats.hits += 1
                return path
        path = self.directory / shard.name
        if self._check(path, shard):
            self.stats.hits += 1
            self._touch(shard)
            return path
        self._make_room(shard.size)
        start = time.monotonic()
        try:
            path = fetch_shard(self.manifest, shard, self.directory, **self._fetch_args)
        except FetchError:
            self.stats.failed += 1
            raise
        self.stats.fetched += 1
        self.stats.fetched_bytes += shard.size
        self.stats.fetch_seconds += time.monotonic() - start
        with self._lock:
            self._verified.add(path)
        self._touch(shard)
        log.debug("fetched %s (%.1f MB/s so far)", shard.name, self.stats.fetch_mb_s)
        return path

    def _check(self, path: Path, shard: Shard) -> bool:
        """Size always; sha256 the first time this process sees the file. A bad copy is removed."""
        if verify_shard(path, shard, sha256=False) is not None:
            return False  # missing or cut short (a fetch puts a whole copy in its place)
        with self._lock:
            if path in self._verified:
                return True
        if problem := verify_shard(path, shard):
            if path.parent == self.directory:
                log.warning("%s: %s; fetching it again", path, problem)
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                log.warning("%s: %s; not using it", path, problem)
            return False
        with self._lock:
            self._verified.add(path)
        return True

    def _touch(self, shard: Shard) -> None:
        with self._lock:
            self._lru[shard.name] = shard.size
            self._lru.move_to_end(shard.name)

    def _make_room(self, incoming: int) -> None:
        if self.limit_bytes is None:
            return
        if incoming > self.limit_bytes:
            raise DataError(
                f"--cache-limit of {self.limit_bytes} bytes is smaller than one shard ({incoming} bytes)"
            )
        with self._lock:
            used = sum(self._lru.values())
            for name in list(self._lru):
                if used + incoming <= self.limit_bytes:
                    break
                if self._pins.get(name):
                    continue
                size = self._lru.pop(name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                self._verified.discard(self.directory / name)
                used -= size
                self.stats.evicted += 1
                log.debug("evicted %s from the shard cache", name)
            if used + incoming > self.limit_bytes:
                log.info("shard cache over its limit: every cached shard is in use (reading or queued)")
