"""What `shardtool fetch` does: choose shards, get them from the torrent and/or HTTP mirrors, report.

`fetch_shard` is the one-shard entry point that hivetrain's cache calls; `fetch_shards` runs a whole
selection with a progress bar and returns a `FetchSummary`. Sources, per `via`:

- `http`: the mirrors given plus the manifest's HTTP base URLs, each shard from one of them (shards are
  spread over mirrors by position; a failing mirror hands over to the next);
- `torrent`: the split's torrent (peers, trackers, DHT, and the web seeds written in the .torrent);
- `auto`: the torrent with every HTTP mirror added as a web seed, then plain HTTP for whatever the swarm
  did not deliver; without a torrent, plain HTTP. For one shard on demand (`fetch_shard`), HTTP comes
  first, since a direct ranged GET starts at once while a swarm needs peers.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import FetchError, ManifestError, ShardtoolError
from ..fsutil import atomic_write_bytes, atomic_write_text
from ..manifest import MANIFEST_NAME, Manifest, Shard, human_bytes, load
from .http import HttpFetcher, HttpOptions, Progress, ShardReport, verified_copy
from .paths import base_url

log = logging.getLogger(__name__)

VIAS = ("auto", "http", "torrent")


# ---- choosing shards ---------------------------------------------------------------------------

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_SLICE = re.compile(r"(\d+)/(\d+)")


def select_shards(shards: Sequence[Shard], spec: str | None) -> list[Shard]:
    """The shards a `--shards` spec names, in manifest order.

    Forms: `0-99,120` (positions, ranges inclusive), `train-000007.tar` (names; may be mixed with
    positions), or `K/N`: the K-th (from 0) of N contiguous, near-equal slices, so N peers that each take
    their own K cover every shard once.
    """
    if spec is None or spec.strip() in ("", "all"):
        return list(shards)
    spec = spec.strip()
    if m := _SLICE.fullmatch(spec):
        k, n = int(m[1]), int(m[2])
        if n == 0 or k >= n:
            raise ShardtoolError(f"--shards {spec}: K/N needs 0 <= K < N")
        lo, hi = len(shards) * k // n, len(shards) * (k + 1) // n
        return list(shards[lo:hi])
    by_name = {s.name: i for i, s in enumerate(shards)}
    chosen: set[int] = set()
    for item in (part.strip() for part in spec.split(",")):
        if item in by_name:
            chosen.add(by_name[item])
        elif m := _RANGE.fullmatch(item):
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if lo > hi or hi >= len(shards):
                raise ShardtoolError(
                    f"--shards {spec}: {item} is not a range within 0-{len(shards) - 1} "
                    f"({len(shards)} shards to choose from)"
                )
            chosen.update(range(lo, hi + 1))
        elif item.endswith(".tar"):
            raise ShardtoolError(f"--shards {spec}: no shard named {item!r} in the selected split(s)")
        else:
            raise ShardtoolError(
                f"--shards {spec}: cannot read {item!r} (use positions like 0-99,120, names like "
                "train-000007.tar, or K/N)"
            )
    return [shards[i] for i in sorted(chosen)]


def http_sources(manifest: Manifest, mirrors: Iterable[str]) -> list[str]:
    """The mirrors given first, then the manifest's HTTP sources; duplicates removed."""
    seen: dict[str, None] = {}
    for url in (*mirrors, *manifest.sources.http):
        if not url.startswith(("http://", "https://")):
            raise ShardtoolError(f"--from {url}: not an http(s) URL")
        seen.setdefault(base_url(url), None)
    return list(seen)


def _rotated(items: list[str], k: int) -> list[str]:
    return items[k % len(items) :] + items[: k % len(items)] if items else items


# ---- one shard ---------------------------------------------------------------------------------


def fetch_shard(
    manifest: Manifest,
    shard: Shard,
    dest_dir: str | Path,
    *,
    mirrors: Sequence[str] = (),
    via: str = "auto",
    timeout: float = 30.0,
    progress: Progress | None = None,
    trust_existing: bool = True,
    peers: Sequence[str] = (),
    torrent_options: Any = None,
) -> Path:
    """Obtain one verified shard at `dest_dir/<shard.name>` and return its path.

    A copy already there is returned at once (size check; sha256 too with `trust_existing=False`).
    Nothing unverified ever sits under the final name. Safe to call from several threads and processes.

    Args:
        via: "http", "torrent", or "auto" (HTTP mirrors first, then the torrent).
        mirrors: extra HTTP base URLs, tried before the manifest's own.
        peers: HOST:PORT BitTorrent peers for the torrent route.
        torrent_options: a `TorrentOptions` for the torrent route (peers are added to it).

    Raises:
        FetchError: no source gave good bytes; the one-line message names each source's failure.
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {VIAS}, not {via!r}")
    dest = Path(dest_dir)
    final = dest / shard.name
    if verified_copy(final, shard, trust_existing=trust_existing):
        return final
    split, _ = manifest.find_shard(shard.name)
    problems = []
    urls = http_sources(manifest, mirrors)
    if via in ("http", "auto") and urls:
        with HttpFetcher(HttpOptions(timeout=timeout)) as http:
            try:
                return http.fetch(shard, urls, dest, progress=progress, trust_existing=trust_existing).path
            except FetchError as e:
                problems.append(str(e))
    if via in ("torrent", "auto") and split in manifest.sources.torrents:
        from .swarm import fetch_from_swarm
        from .torrent import TorrentOptions, read_torrent

        options = torrent_options or TorrentOptions(stall_timeout=timeout)
        options = dataclasses.replace(options, peers=(*options.peers, *peers))
        try:
            data = read_torrent(manifest, split, mirrors=mirrors, timeout=timeout)
        except FetchError as e:
            problems.append(str(e))
        else:
            result = fetch_from_swarm(
                data,
                manifest,
                split,
                [shard],
                dest,
                options,
                progress=progress,
                trust_existing=trust_existing,
            )
            if shard.name in result.done:
                return result.done[shard.name]
            problems.append(f"torrent: {result.failed.get(shard.name, 'not delivered')}")
    if not problems:
        raise FetchError(f"{shard.name}: no {'source' if via == 'auto' else via + ' source'} in the manifest")
    raise FetchError(f"{shard.name}: " + "; ".join(p.removeprefix(f"{shard.name}: ") for p in problems))


# ---- many shards -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchOptions:
    """How `fetch_shards` works.

    Attributes:
        via: "auto", "http" or "torrent" (see the module docstring).
        mirrors: extra HTTP base URLs (`--from`).
        jobs: shards downloaded at once over HTTP.
        recheck: hash shards already present instead of trusting their size.
        progress: show a progress bar on stderr (None: only on a terminal).
    """

    via: str = "auto"
    mirrors: tuple[str, ...] = ()
    jobs: int = 4
    recheck: bool = False
    progress: bool | None = None
    http: HttpOptions = field(default_factory=HttpOptions)
    torrent: Any = None  # TorrentOptions; typed loosely so that HTTP-only use never imports libtorrent


@dataclass
class FetchSummary:
    """The outcome of a fetch, for people (`text()`) and scripts (`to_dict()`)."""

    requested: int = 0
    present: int = 0
    fetched: dict[str, str] = field(default_factory=dict)  # shard -> source
    failed: dict[str, str] = field(default_factory=dict)  # shard -> reason
    problems: list[str] = field(default_factory=list)  # sources that misbehaved
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "requested": self.requested,
            "present": self.present,
            "fetched": len(self.fetched),
            "failed": self.failed,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.bytes / self.seconds / 1e6, 2) if self.seconds else None,
            "sources": self.fetched,
            "problems": self.problems,
        }

    def text(self) -> str:
        rate = f", {human_bytes(self.bytes / self.seconds)}/s" if self.seconds and self.bytes else ""
        lines = [
            f"{self.requested} shards requested: {len(self.fetched)} fetched "
            f"({human_bytes(self.bytes)} in {self.seconds:.1f} s{rate}), {self.present} already present, "
            f"{len(self.failed)} failed"
        ]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"failed: {name}: {why}" for name, why in self.failed.items()]
        return "\n".join(lines)


class _Bar:
    """A thread-safe tqdm byte bar with a shards-done counter."""

    def __init__(self, total_bytes: int, total_shards: int, enabled: bool | None):
        self.lock = threading.Lock()
        self.done = 0
        self.total_shards = total_shards
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="fetch",
            disable=None if enabled is None else not enabled,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.bar.set_postfix_str(f"0/{total_shards} shards", refresh=False)

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def shard_done(self) -> None:
        with self.lock:
            self.done += 1
            self.bar.set_postfix_str(f"{self.done}/{self.total_shards} shards")

    def close(self) -> None:
        self.bar.close()


def fetch_shards(
    manifest: Manifest, shards: dict[str, list[Shard]], dest: Path, options: FetchOptions
) -> FetchSummary:
    """Fetch `shards` (split -> selected shards) into `dest`; never raises for a shard that fails."""
    if options.via not in VIAS:
        raise ShardtoolError(f"--via {options.via}: use one of {', '.join(VIAS)}")
    dest.mkdir(parents=True, exist_ok=True)
    summary = FetchSummary(requested=sum(len(v) for v in shards.values()))
    urls = http_sources(manifest, options.mirrors)
    if options.via == "torrent":
        for split in shards:
            if split not in manifest.sources.torrents:
                raise FetchError(f"{manifest.origin}: no torrent for split {split!r}; fetch with --via http")
    elif options.via == "http" and not urls:
        raise FetchError(f"{manifest.origin}: no HTTP source (pass a mirror with --from URL)")
    elif not urls and not any(s in manifest.sources.torrents for s in shards):
        raise FetchError(f"{manifest.origin}: no HTTP source and no torrent (pass a mirror with --from URL)")

    start = time.monotonic()
    missing: dict[str, list[Shard]] = {}
    for split, chosen in shards.items():
        todo = _missing(chosen, dest, recheck=options.recheck, jobs=options.jobs)
        summary.present += len(chosen) - len(todo)
        if todo:
            missing[split] = todo
    bar = _Bar(
        sum(s.size for v in missing.values() for s in v), sum(map(len, missing.values())), options.progress
    )
    try:
        for split, todo in missing.items():
            if options.via != "http" and split in manifest.sources.torrents:
                todo = _from_swarm(manifest, split, todo, dest, options, urls, summary, bar)
            if todo and options.via != "torrent":
                _from_http(todo, dest, options, urls, summary, bar)
            elif todo:
                summary.failed.update((s.name, summary.failed.get(s.name, "not delivered")) for s in todo)
    finally:
        bar.close()
    summary.seconds = time.monotonic() - start
    return summary


def _missing(chosen: list[Shard], dest: Path, *, recheck: bool, jobs: int) -> list[Shard]:
    """The shards of `chosen` without a verified copy in `dest` (hashed in parallel with --recheck)."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        ok = list(pool.map(lambda s: verified_copy(dest / s.name, s, trust_existing=not recheck), chosen))
    return [s for s, good in zip(chosen, ok) if not good]


def _from_swarm(manifest, split, todo, dest, options, urls, summary, bar) -> list[Shard]:
    """Fetch a split's shards from its torrent; returns those it did not deliver."""
    from libtorrent import bdecode as lt_bdecode

    from .swarm import fetch_from_swarm
    from .torrent import TorrentOptions, read_torrent

    try:
        data = read_torrent(manifest, split, mirrors=options.mirrors, timeout=options.http.timeout)
    except FetchError as e:
        if options.via == "torrent":
            summary.failed.update((s.name, str(e)) for s in todo)
            return []
        summary.problems.append(str(e))
        return todo
    torrent_path = dest / manifest.sources.torrents[split].file
    if not torrent_path.exists() or torrent_path.read_bytes() != data:
        atomic_write_bytes(torrent_path, data, fsync=False)
    infohash = manifest.sources.torrents[split].infohash

    def done(shard: Shard, path: Path) -> None:
        summary.fetched[shard.name] = f"torrent:{infohash}"
        summary.bytes += shard.size
        bar.shard_done()

    reported = 0

    def progress(n: int) -> None:
        nonlocal reported
        reported += n
        bar.update(n)

    web_seeds = []
    torrent_options = options.torrent or TorrentOptions()
    if options.via == "auto":
        web_seeds = _web_seeds(urls, manifest.sources.torrents[split].name, todo[0], options.http.timeout)
        meta = lt_bdecode(data)
        finders = (
            torrent_options.peers or torrent_options.trackers or torrent_options.dht or torrent_options.lsd
        )
        if not (web_seeds or finders or meta.get(b"announce") or meta.get(b"url-list")):
            log.info("%s: the torrent has no way to find peers here; fetching over HTTP", split)
            return todo
    result = fetch_from_swarm(
        data,
        manifest,
        split,
        todo,
        dest,
        torrent_options,
        web_seeds=web_seeds,
        progress=progress,
        trust_existing=not options.recheck,
        on_shard=done,
    )
    bar.update(-reported)  # the HTTP round, if any, counts its own bytes from here
    bar.update(sum(s.size for s in todo if s.name in result.done))
    summary.problems += result.problems
    left = [s for s in todo if s.name not in result.done]
    if options.via == "torrent":
        summary.failed.update(
            (s.name, f"torrent: {result.failed.get(s.name, 'not delivered')}") for s in left
        )
        return []
    for s in left:
        log.info("%s: %s; trying HTTP", s.name, result.failed.get(s.name, "not delivered by the swarm"))
    return left


def _web_seeds(urls: list[str], name: str, shard: Shard, timeout: float) -> list[str]:
    """The mirrors that can act as web seeds: they serve `<name>/<shard>` and honour Range.

    libtorrent stalls silently on a server that ignores Range, and a mirror without the torrent's
    folder layout only produces errors; such mirrors are left to the plain HTTP round.
    """
    import httpx

    usable = []
    with httpx.Client(timeout=timeout) as client:
        for url in urls:
            try:
                resp = client.get(f"{url}{name}/{shard.name}", headers={"Range": "bytes=0-0"})
                ok = resp.status_code == 206 and len(resp.content) == 1
            except httpx.HTTPError:
                ok = False
            if ok:
                usable.append(url)
            else:
                log.info("%s: not used as a web seed (no %s/%s with Range support)", url, name, shard.name)
    return usable


def _completed(futures):
    """as_completed, with a timeout on each wait so that Ctrl-C is noticed at once."""
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        yield from finished


def _from_http(todo, dest, options, urls, summary, bar) -> None:
    if not urls:
        summary.failed.update((s.name, summary.failed.get(s.name, "no HTTP source")) for s in todo)
        return
    with HttpFetcher(options.http) as http, ThreadPoolExecutor(max(1, options.jobs)) as pool:
        futures = {
            pool.submit(
                http.fetch,
                s,
                _rotated(urls, i),
                dest,
                progress=bar.update,
                trust_existing=not options.recheck,
            ): s
            for i, s in enumerate(todo)
        }
        try:
            for future in _completed(futures):
                _record(futures[future], future, dest, summary, bar)
        except BaseException:  # Ctrl-C: stop the downloads in flight instead of waiting for them
            http.stop()
            pool.shutdown(cancel_futures=True)
            raise


def _record(shard: Shard, future, dest: Path, summary: FetchSummary, bar: _Bar) -> None:
    try:
        report: ShardReport = future.result()
    except FetchError as e:
        summary.failed[shard.name] = str(e).removeprefix(f"{shard.name}: ")
        return
    except OSError as e:
        summary.failed[shard.name] = f"cannot write in {dest} ({e.strerror})"
        return
    summary.failed.pop(shard.name, None)
    summary.fetched[shard.name] = report.source or "present"
    summary.bytes += report.downloaded
    summary.problems += [f"{shard.name}: {p}" for p in report.problems]
    bar.shard_done()


# ---- the destination folder --------------------------------------------------------------------


def prepare_destination(manifest: Manifest, dest: Path) -> None:
    """Write the manifest into `dest` (so that it can be served, seeded and verified later).

    Refuses a folder whose manifest describes other data, rather than mixing two datasets. Not fsynced:
    on ext4 an fsync waits for every dirty block of the file system (seconds after a large fetch), and
    a manifest lost to a power failure is simply written again by the next fetch.
    """
    target = dest / MANIFEST_NAME
    origin = manifest.origin
    if origin and not _is_url(origin) and Path(origin).resolve() == target.resolve():
        return
    text = manifest.to_json()
    try:
        if target.read_text() == text:
            return
        existing = load(target)
    except (OSError, UnicodeDecodeError, ManifestError):
        existing = None
    if existing is not None and existing.fingerprint() != manifest.fingerprint():
        raise FetchError(f"{target}: describes other data ({existing.dataset}); choose another --out")
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, text, fsync=False)


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))
