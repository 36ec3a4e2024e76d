"""Fetching selected shards from a BitTorrent swarm (peers, trackers, DHT, BEP 19 web seeds).

Only the wanted shards get a file priority. Every file of the torrent is mapped to
`.shardtool-partial/<name>.bt`, so libtorrent never writes under a final name; a finished file moves
there (renamed by libtorrent itself, which may still hold it open) only after its sha256 matches the
manifest, on top of libtorrent's SHA-1 piece checks. An interrupted fetch resumes: without resume data,
libtorrent re-checks the partial files when the torrent is added again.

A finished file is not yet on disk when libtorrent says so (its writes may still be queued), so the
order for each file is: `file_completed_alert` -> `flush_cache()`, which libtorrent runs as a fence
behind every write queued before it -> `cache_flushed_alert` -> sha256 in a worker thread ->
`rename_file` -> `file_renamed_alert`.

Sources that send bad data are not left to retry forever: a web seed with repeated errors or failed
pieces is dropped and reported, and the whole fetch gives up (for the caller to fall back to HTTP) when
no data has arrived for `TorrentOptions.stall_timeout` seconds.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from ..fsutil import sha256_file
from ..manifest import Manifest, Shard
from .http import Progress, verified_copy
from .paths import PARTIAL_DIR, base_url
from .torrent import TorrentOptions, check_torrent, connect_peers, file_indices, open_session

log = logging.getLogger(__name__)

PRIORITY = 4


@dataclass
class SwarmResult:
    """Per-shard outcome of a swarm fetch."""

    done: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    downloaded: int = 0


def fetch_from_swarm(
    torrent: bytes,
    manifest: Manifest,
    split: str,
    shards: Sequence[Shard],
    dest: Path,
    options: TorrentOptions,
    *,
    web_seeds: Sequence[str] = (),
    progress: Progress | None = None,
    trust_existing: bool = True,
    on_shard: Callable[[Shard, Path], None] | None = None,
) -> SwarmResult:
    """Download `shards` (all of one split) into `dest` from the torrent's swarm and web seeds.

    Shards already present (see `verified_copy`) are not downloaded. Never raises for a shard that
    could not be had: it is listed in `failed` with the reason.
    """
    result = SwarmResult()
    wanted = []
    for shard in shards:
        final = dest / shard.name
        if verified_copy(final, shard, trust_existing=trust_existing):
            result.done[shard.name] = final
        else:
            wanted.append(shard)
    if wanted:
        _SwarmFetch(
            torrent, manifest, split, wanted, dest, options, web_seeds, progress, on_shard, result
        ).run()
    return result


class _SwarmFetch:
    """The alert loop of one fetch (one session, one torrent)."""

    def __init__(
        self, torrent, manifest, split, wanted, dest, options, web_seeds, progress, on_shard, result
    ):
        self.ti = check_torrent(torrent, manifest, split)
        self.index = file_indices(self.ti)
        self.by_index = {self.index[s.name]: s for s in wanted}
        self.dest = dest.resolve()
        self.options = options
        self.web_seeds = [base_url(u) for u in web_seeds]
        self.progress = progress
        self.on_shard = on_shard
        self.result = result
        self.remaining = set(self.by_index)
        self.to_flush: set[int] = set()
        self.flushing: set[int] | None = None
        self.hashing: dict[int, Future] = {}
        self.renaming: set[int] = set()
        self.seed_errors: Counter[str] = Counter()
        self.reported = 0
        self.wanted_bytes = sum(s.size for s in wanted)
        self.last_data = time.monotonic()
        self.last_done = -1

    def _params(self) -> lt.add_torrent_params:
        atp = lt.add_torrent_params()
        atp.ti = self.ti
        atp.save_path = str(self.dest)
        layout = self.ti.layout()
        atp.renamed_files = {i: f"{PARTIAL_DIR}/{layout.file_name(i)}.bt" for i in range(layout.num_files())}
        atp.file_priorities = [PRIORITY if i in self.by_index else 0 for i in range(layout.num_files())]
        atp.part_file_dir = str(self.dest / PARTIAL_DIR)
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        atp.url_seeds = self.web_seeds
        atp.trackers = list(self.options.trackers)
        return atp

    def run(self) -> None:
        session = open_session(self.options)
        pool = ThreadPoolExecutor(2, "shard-verify")
        try:
            self.handle = session.add_torrent(self._params())
            connect_peers(self.handle, self.options.peers)
            while self.remaining:
                session.wait_for_alert(200)
                for alert in session.pop_alerts():
                    self._on_alert(alert)
                self._start_hashing(pool)
                self._collect_hashes()
                self._tick()
            self.result.downloaded = self.handle.status().total_payload_download
        finally:
            pool.shutdown(cancel_futures=True)
            self._remove(session)

    def _remove(self, session: lt.session) -> None:
        """Remove the torrent and wait until libtorrent has closed its files."""
        if not getattr(self, "handle", None):
            return
        session.remove_torrent(self.handle)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            session.wait_for_alert(200)
            if any(isinstance(a, lt.torrent_removed_alert) for a in session.pop_alerts()):
                return

    # ---- events ---------------------------------------------------------------------------------

    def _on_alert(self, alert) -> None:
        if isinstance(alert, lt.file_completed_alert):
            if alert.index in self.remaining:
                self.to_flush.add(alert.index)
                self._flush()
        elif isinstance(alert, lt.torrent_checked_alert):
            self._queue_complete_files()
        elif isinstance(alert, lt.cache_flushed_alert):
            flushed, self.flushing = self.flushing or set(), None
            for i in flushed:
                self.hashing[i] = None  # ready for a worker
            self._flush()
        elif isinstance(alert, lt.file_renamed_alert):
            if alert.index in self.renaming:
                self.renaming.discard(alert.index)
                self._finish(alert.index)
        elif isinstance(alert, lt.file_rename_failed_alert):
            if alert.index in self.renaming:
                self.renaming.discard(alert.index)
                self._fail(alert.index, f"could not rename into place ({alert.error.message()})")
        elif isinstance(alert, lt.url_seed_alert):
            self._web_seed_trouble(alert.server_url, alert.error_message or alert.message())
        elif isinstance(alert, lt.hash_failed_alert):
            log.info("piece %d failed its hash check", alert.piece_index)
            for peer in self.handle.get_peer_info():
                if peer.connection_type == lt.peer_info.web_seed and peer.downloading_piece_index == -1:
                    continue
            for url in self.handle.url_seeds():
                self._web_seed_trouble(url, f"piece {alert.piece_index} failed its hash check")
        elif isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
            message = alert.message()
            log.warning("%s", message)
            for i in list(self.remaining):
                self._fail(i, message)
        elif alert.category() & lt.alert_category.error:
            log.debug("%s", alert.message())

    def _web_seed_trouble(self, url: str, what: str) -> None:
        self.seed_errors[url] += 1
        log.info("web seed %s: %s", url, what)
        if self.seed_errors[url] == self.options.web_seed_failures:
            self.handle.remove_url_seed(url)
            problem = (
                f"web seed {url}: dropped after {self.options.web_seed_failures} failures (last: {what})"
            )
            log.warning("%s", problem)
            self.result.problems.append(problem)

    def _queue_complete_files(self) -> None:
        """Files that a re-check found complete (an earlier, interrupted fetch)."""
        progress = self.handle.file_progress(lt.torrent_handle.piece_granularity)
        for i in self.remaining:
            if progress[i] == self.by_index[i].size and i not in self.hashing and i not in self.renaming:
                self.to_flush.add(i)
        self._flush()

    def _flush(self) -> None:
        if self.flushing is None and self.to_flush:
            self.flushing, self.to_flush = self.to_flush, set()
            self.handle.flush_cache()

    def _start_hashing(self, pool: ThreadPoolExecutor) -> None:
        for i, future in self.hashing.items():
            if future is None:
                path = self.dest / PARTIAL_DIR / f"{self.by_index[i].name}.bt"
                self.hashing[i] = pool.submit(sha256_file, path)

    def _collect_hashes(self) -> None:
        for i, future in list(self.hashing.items()):
            if future is None or not future.done():
                continue
            del self.hashing[i]
            shard = self.by_index[i]
            try:
                digest = future.result()
            except OSError as e:
                self._fail(i, f"cannot read the downloaded file ({e.strerror})")
                continue
            if digest != shard.sha256:
                self._fail(i, "sha256 differs from the manifest although the torrent's pieces checked out")
                continue
            self.renaming.add(i)
            self.handle.rename_file(i, shard.name)

    def _finish(self, i: int) -> None:
        shard = self.by_index[i]
        path = self.dest / shard.name
        self.remaining.discard(i)
        self.handle.file_priority(i, 0)
        self.result.done[shard.name] = path
        log.debug("%s: verified", shard.name)
        if self.on_shard:
            self.on_shard(shard, path)

    def _fail(self, i: int, reason: str) -> None:
        if i not in self.remaining:
            return
        self.remaining.discard(i)
        self.handle.file_priority(i, 0)
        self.result.failed[self.by_index[i].name] = reason

    def _tick(self) -> None:
        """Progress, and giving up when nothing has arrived for too long."""
        status = self.handle.status()
        now = time.monotonic()
        done = min(status.total_wanted_done, self.wanted_bytes)
        if done != self.last_done or status.state in (
            lt.torrent_status.checking_files,
            lt.torrent_status.checking_resume_data,
        ):
            self.last_data = now
        if self.progress and done > self.reported:
            self.progress(done - self.reported)
            self.reported = done
        self.last_done = done
        if now - self.last_data > self.options.stall_timeout and not self.hashing and not self.renaming:
            reason = (
                f"no data from the swarm for {self.options.stall_timeout:.0f} s "
                f"({status.num_peers} peers, {len(self.handle.url_seeds())} web seeds)"
            )
            for i in list(self.remaining):
                self._fail(i, reason)
