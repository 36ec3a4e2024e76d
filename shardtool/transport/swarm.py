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

libtorrent bans a peer that sent a bad piece, and also, after a few failed pieces, every peer that sent
blocks of them: one bad peer can get the good ones banned too. When bans leave the torrent without a
peer, it is added again (a fresh peer list; the pieces on disk are checked and kept), at most
`MAX_RESTARTS` times, so a good peer gets another chance and a bad one is banned again at its next bad
piece.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from ..fsutil import sha256_file
from ..manifest import Manifest, Shard
from ..verify import verify_shard
from .http import Progress
from .paths import PARTIAL_DIR, base_url
from .torrent import TorrentOptions, check_torrent, connect_peers, file_indices, open_session

log = logging.getLogger(__name__)

PRIORITY = 4
REANNOUNCE = 10.0  # seconds without peers before asking the trackers again
MAX_RESTARTS = 3  # fresh peer lists after bans left the torrent without a peer
_CHECKING = (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)


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

    Shards already present (by size; by sha256 too unless `trust_existing`) are not downloaded. Never
    raises for a shard that could not be had: it is listed in `failed` with the reason.
    """
    result = SwarmResult()
    wanted = []
    for shard in shards:
        final = dest / shard.name
        if verify_shard(final, shard, sha256=not trust_existing) is None:
            result.done[shard.name] = final
        else:
            wanted.append(shard)
    if wanted:
        _SwarmFetch(
            torrent, manifest, split, wanted, dest, options, web_seeds, progress, on_shard, result
        ).run()
    return result


def can_find_peers(torrent: bytes, options: TorrentOptions) -> bool:
    """Has a fetch of `torrent` any way to reach its swarm: peers, trackers, DHT or LSD, or web seeds
    written in the .torrent?"""
    meta = lt.bdecode(torrent)
    finders = options.peers or options.trackers or options.dht or options.lsd
    return bool(finders or meta.get(b"announce") or meta.get(b"url-list"))


class _SwarmFetch:
    """The alert loop of one fetch (one session, one torrent)."""

    def __init__(
        self, torrent, manifest, split, wanted, dest, options, web_seeds, progress, on_shard, result
    ):
        self.torrent = torrent
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
        self.dropped: set[str] = set()
        self.senders: dict[int, set[tuple[str, int]]] = {}
        self.all_seeds: set[str] = set()
        self.reported = 0
        self.wanted_bytes = sum(s.size for s in wanted)
        self.last_data = time.monotonic()
        self.last_done = -1
        self.last_announce = time.monotonic()
        self.bans = 0  # peers banned since the torrent was (re)added
        self.restarts = 0
        self.downloaded = 0  # payload of earlier handles (restarts)

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
            if self.web_seeds or lt.bdecode(self.torrent).get(b"url-list"):
                # per-block senders, to tell which web seed sent a bad piece
                mask = session.get_settings()["alert_mask"] | lt.alert_category.block_progress
                session.apply_settings({"alert_mask": mask})
            self.session = session
            self._add()
            self.all_seeds = set(self.handle.url_seeds())
            self.peer_sources = bool(
                self.options.peers or self.options.trackers or self.options.dht or self.options.lsd
            ) or bool(self.handle.trackers())
            while self.remaining:
                session.wait_for_alert(200)
                for alert in session.pop_alerts():
                    self._on_alert(alert)
                self._start_hashing(pool)
                self._collect_hashes()
                self._tick()
            self.result.downloaded = self.downloaded + self.handle.status().total_payload_download
        finally:
            pool.shutdown(cancel_futures=True)
            self._remove(session)

    def _add(self) -> None:
        self.handle = self.session.add_torrent(self._params())
        connect_peers(self.handle, self.options.peers)

    def _restart(self) -> None:
        """Add the torrent again: libtorrent forgets its bans, and checks and keeps the pieces on disk."""
        self.restarts += 1
        log.warning(
            "no peer left after %d ban(s) for bad pieces (libtorrent also bans peers that only shared a "
            "bad piece): adding the torrent again (%d of %d)",
            self.bans,
            self.restarts,
            MAX_RESTARTS,
        )
        self.downloaded += self.handle.status().total_payload_download
        self._remove(self.session)
        self.bans, self.last_done, self.last_data = 0, -1, time.monotonic()
        self._add()

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
            self._web_seed_error(alert.server_url(), alert.error_message() or alert.message())
        elif isinstance(alert, lt.block_finished_alert):
            self.senders.setdefault(alert.piece_index, set()).add(tuple(alert.endpoint))
        elif isinstance(alert, lt.piece_finished_alert):
            self.senders.pop(alert.piece_index, None)
        elif isinstance(alert, lt.hash_failed_alert):
            self._blame(alert.piece_index)
        elif isinstance(alert, lt.peer_ban_alert):
            self.bans += 1
            problem = f"peer {alert.ip[0]}:{alert.ip[1]}: banned (it sent blocks of pieces that failed their hash check)"
            if problem not in self.result.problems:
                log.warning("%s", problem)
                self.result.problems.append(problem)
        elif isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
            message = alert.message()
            log.warning("%s", message)
            for i in list(self.remaining):
                self._fail(i, message)
        elif alert.category() & lt.alert_category.error:
            log.debug("%s", alert.message())

    def _blame(self, piece: int) -> None:
        """A piece failed its hash: count it against the web seeds that sent its blocks.

        libtorrent bans BitTorrent peers that send bad data, but retries a bad web seed forever.
        """
        senders = self.senders.pop(piece, set())
        log.info("piece %d failed its hash check (sent by %s)", piece, sorted(senders) or "unknown")
        for url in self.handle.url_seeds():
            if _endpoints(url) & senders:
                self._web_seed_error(url, f"piece {piece} failed its hash check")

    def _web_seed_error(self, url: str, what: str) -> None:
        """Count a web seed's errors; past the cap, drop it (libtorrent would retry it forever)."""
        self.seed_errors[url] += 1
        log.info("web seed %s: %s", url, what)
        if self.seed_errors[url] == self.options.web_seed_failures and url in self.handle.url_seeds():
            self.handle.remove_url_seed(url)
            self._report_dropped(url, f"{self.options.web_seed_failures} errors, the last: {what}")

    def _report_dropped(self, url: str, why: str) -> None:
        if url in self.dropped:
            return
        self.dropped.add(url)
        problem = f"web seed {url}: dropped ({why})"
        log.warning("%s", problem)
        self.result.problems.append(problem)

    def _check_web_seeds(self) -> None:
        """libtorrent sometimes drops a web seed itself (bad data from it alone): report that too."""
        current = set(self.handle.url_seeds())
        for url in self.all_seeds - current:
            self._report_dropped(url, "libtorrent banned it after data that failed the piece hashes")

    def _queue_complete_files(self) -> None:
        """Files that a re-check found complete (an earlier, interrupted fetch)."""
        progress = self.handle.file_progress(lt.torrent_handle.piece_granularity)
        for i in self.remaining:
            if progress[i] == self.by_index[i].size and i not in self.hashing and i not in self.renaming:
                self.to_flush.add(i)
        self._flush()

    @property
    def _flushing(self) -> bool:
        return self.flushing is not None or bool(self.to_flush)

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
        if done != self.last_done or status.state in _CHECKING:
            self.last_data = now
        if self.progress and done > self.reported:
            self.progress(done - self.reported)
            self.reported = done
        self.last_done = done
        if status.num_peers == 0 and now - self.last_announce > REANNOUNCE:
            # a fetcher that announced before any seeder would otherwise wait a whole tracker interval
            self.last_announce = now
            self.handle.force_reannounce(0, -1, lt.reannounce_flags_t.ignore_min_interval)
        self._check_web_seeds()
        if self.hashing or self.renaming or status.state in _CHECKING:
            return
        if self.bans and not status.num_peers and self.restarts < MAX_RESTARTS and not self._flushing:
            self._restart()
            return
        if not self.peer_sources and not self.handle.url_seeds():
            reason = "no source left (no peers, trackers or DHT, and every web seed was dropped)"
        elif now - self.last_data > self.options.stall_timeout:
            reason = (
                f"no data from the swarm for {self.options.stall_timeout:.0f} s "
                f"({status.num_peers} peers, {len(self.handle.url_seeds())} web seeds)"
            )
        else:
            return
        for i in list(self.remaining):
            self._fail(i, reason)


@functools.cache
def _endpoints(url: str) -> frozenset[tuple[str, int]]:
    """The (ip, port) pairs a web seed URL connects to, to match libtorrent's per-block senders."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return frozenset()
    return frozenset((info[4][0], port) for info in infos)
