"""The routes a shard can take to this machine, and the one rule that orders them.

A route fetches what it can of a list of shards into a folder and says what became of each
(`RouteResult`): `HttpRoute` takes each shard from one HTTP mirror and fails over to the next, with the
shards spread over the mirrors by position; `SwarmRoute` downloads a split's shards from its torrent's
swarm and web seeds. `order_routes` is the rule for a `via` (a pure function), `routes_for` builds the
routes it names for one split, and `run_routes` hands each route what the routes before it did not
deliver. `fetch_shard` (one shard on demand) and `fetch_shards` (a selection, for the CLI) are both
these calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import FetchError, ShardtoolError, SourceFailure
from ..fsutil import atomic_write_bytes
from ..manifest import Manifest, Shard, is_url
from .http import HttpFetcher, Progress
from .options import FetchOptions, HttpOptions, TorrentOptions
from .paths import base_url

log = logging.getLogger(__name__)

VIAS = ("auto", "http", "torrent")


@dataclass(frozen=True)
class Delivered:
    """A shard a route placed (or found) under its final name."""

    path: Path
    source: str  # the URL that delivered it, `torrent:<infohash>`, or "present" (a verified copy was there)
    downloaded: int  # bytes counted for it


OnShard = Callable[[Shard, Delivered], None]
"""Called as each shard is delivered, in the thread that runs the route."""


@dataclass
class RouteResult:
    """What became of each shard given to a route (or, from `run_routes`, to all of them).

    Attributes:
        done: the shards delivered.
        failed: why each of the others was not (from `run_routes`: every route's reason, in order).
        problems: sources that misbehaved, whether or not the shards arrived in the end.
        error: the route could not start at all (no .torrent to be had); the reason of every shard.
    """

    done: dict[str, Delivered] = field(default_factory=dict)
    failed: dict[str, FetchError] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: FetchError | None = None


class Route(Protocol):
    """One way of getting shards; never raises for a shard it could not deliver."""

    name: str

    def fetch(
        self,
        shards: Sequence[Shard],
        dest: Path,
        *,
        progress: Progress | None = None,
        trust_existing: bool = True,
        on_shard: OnShard | None = None,
    ) -> RouteResult: ...


# ---- the order ---------------------------------------------------------------------------------


def order_routes(via: str, *, http: bool, torrent: bool, on_demand: bool = False) -> tuple[str, ...]:
    """The routes to try, in order, among those that exist (`http`: mirrors; `torrent`: a torrent).

    - "http", "torrent": that route only;
    - "auto": the torrent first (with every mirror that can act as a BEP 19 web seed), then plain HTTP
      for whatever the swarm did not deliver. For one shard wanted now (`on_demand`: the shard cache),
      HTTP first, since a direct ranged GET starts at once while a swarm needs peers.
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {VIAS}, not {via!r}")
    have = {"http": http and via != "torrent", "torrent": torrent and via != "http"}
    order = ("http", "torrent") if on_demand else ("torrent", "http")
    return tuple(name for name in order if have[name])


def http_sources(manifest: Manifest, mirrors: Iterable[str]) -> list[str]:
    """The mirrors given first, then the manifest's HTTP sources; duplicates removed."""
    seen: dict[str, None] = {}
    for url in (*mirrors, *manifest.sources.http):
        if not is_url(url):
            raise ShardtoolError(f"--from {url}: not an http(s) URL")
        seen.setdefault(base_url(url), None)
    return list(seen)


def routes_for(
    manifest: Manifest, split: str, options: FetchOptions, *, on_demand: bool = False
) -> list[Route]:
    """The routes of `order_routes` for one split's shards.

    The torrent route gets the mirrors as web-seed candidates only when plain HTTP comes after it, and
    keeps the .torrent in the destination (so that the folder can be seeded) unless `on_demand`.
    """
    urls = http_sources(manifest, options.mirrors)
    names = order_routes(
        options.via, http=bool(urls), torrent=split in manifest.sources.torrents, on_demand=on_demand
    )
    routes: list[Route] = []
    for k, name in enumerate(names):
        if name == "http":
            routes.append(HttpRoute(urls, options.http, jobs=options.jobs))
        else:
            web_seeds = urls if "http" in names[k + 1 :] else ()
            routes.append(
                SwarmRoute(manifest, split, options, web_seeds=web_seeds, keep_torrent=not on_demand)
            )
    return routes


def run_routes(
    routes: Sequence[Route],
    shards: Sequence[Shard],
    dest: Path,
    *,
    via: str = "auto",
    progress: Progress | None = None,
    trust_existing: bool = True,
    on_shard: OnShard | None = None,
) -> RouteResult:
    """Each route in turn fetches what the routes before it did not deliver.

    A shard no route delivered fails with every route's reason, joined in the order they were tried;
    a route that could not start while another follows is also reported among the problems.
    """
    outcome = RouteResult()
    reasons: dict[str, list[FetchError]] = {s.name: [] for s in shards}
    left = list(shards)
    for k, route in enumerate(routes):
        if not left:
            break
        result = route.fetch(left, dest, progress=progress, trust_existing=trust_existing, on_shard=on_shard)
        after = routes[k + 1].name if k + 1 < len(routes) else None
        outcome.done.update(result.done)
        outcome.problems += result.problems
        if result.error is not None and after:
            outcome.problems.append(str(result.error))
        left = [s for s in left if s.name not in result.done]
        for s in left:
            error = result.failed.get(s.name) or result.error or FetchError(f"{route.name}: not delivered")
            reasons[s.name].append(error)
            if after:
                log.info("%s: %s; trying %s", s.name, error.reason, after)
    for s in left:
        if errors := reasons[s.name]:
            reason = "; ".join(e.reason for e in errors)
            failures = [f for e in errors for f in e.failures]
        else:
            reason, failures = f"no {'source' if via == 'auto' else via + ' source'} in the manifest", []
        outcome.failed[s.name] = FetchError(reason, shard=s.name, failures=failures)
    return outcome


# ---- HTTP --------------------------------------------------------------------------------------


class HttpRoute:
    """HTTP mirrors: each shard from one of them, failing over to the next (`HttpFetcher.fetch`).

    Shard k starts at mirror k (mod their number), so that `jobs` parallel downloads share the mirrors.
    """

    name = "http"

    def __init__(self, urls: Sequence[str], options: HttpOptions, *, jobs: int = 1):
        self.urls, self.options, self.jobs = list(urls), options, max(1, jobs)

    def fetch(self, shards, dest, *, progress=None, trust_existing=True, on_shard=None) -> RouteResult:
        result = RouteResult()
        with HttpFetcher(self.options) as http, ThreadPoolExecutor(self.jobs) as pool:
            futures = {
                pool.submit(
                    http.fetch,
                    s,
                    _rotated(self.urls, i),
                    dest,
                    progress=progress,
                    trust_existing=trust_existing,
                ): s
                for i, s in enumerate(shards)
            }
            try:
                for future in _completed(futures):
                    _record(futures[future], future, dest, result, on_shard)
            except BaseException:  # Ctrl-C: stop the downloads in flight instead of waiting for them
                http.stop()
                pool.shutdown(cancel_futures=True)
                raise
        return result


def _rotated(items: list[str], k: int) -> list[str]:
    return items[k % len(items) :] + items[: k % len(items)] if items else items


def _completed(futures):
    """as_completed, with a timeout on each wait so that Ctrl-C is noticed at once."""
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        yield from finished


def _record(shard: Shard, future, dest: Path, result: RouteResult, on_shard: OnShard | None) -> None:
    try:
        report = future.result()
    except FetchError as e:
        result.failed[shard.name] = e
        return
    except OSError as e:
        result.failed[shard.name] = FetchError(f"cannot write in {dest} ({e.strerror})", shard=shard.name)
        return
    delivered = Delivered(report.path, report.source or "present", report.downloaded)
    result.done[shard.name] = delivered
    result.problems += [f"{shard.name}: {p}" for p in report.problems]
    if on_shard:
        on_shard(shard, delivered)


# ---- BitTorrent --------------------------------------------------------------------------------


class SwarmRoute:
    """A split's torrent: its swarm (given peers, trackers, DHT, LSD) and BEP 19 web seeds.

    Args:
        web_seeds: HTTP mirrors to add as web seeds (those that serve the torrent's layout with Range);
            given when plain HTTP comes next, which is also when a torrent with no way to find a peer
            is passed over at once.
        keep_torrent: save the .torrent in the destination, so that the folder can seed in turn.
    """

    name = "torrent"

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        options: FetchOptions,
        *,
        web_seeds: Sequence[str] = (),
        keep_torrent: bool = False,
    ):
        self.manifest, self.split, self.options = manifest, split, options
        self.web_seeds, self.keep_torrent = list(web_seeds), keep_torrent

    def fetch(self, shards, dest, *, progress=None, trust_existing=True, on_shard=None) -> RouteResult:
        from .swarm import can_find_peers, fetch_from_swarm
        from .torrent import read_torrent

        info = self.manifest.sources.torrents[self.split]
        timeout = self.options.http.timeout
        torrent = self.options.torrent or TorrentOptions()
        try:
            data = read_torrent(self.manifest, self.split, mirrors=self.options.mirrors, timeout=timeout)
        except FetchError as e:
            return RouteResult(error=e)
        if self.keep_torrent:
            path = dest / info.file
            if not path.exists() or path.read_bytes() != data:
                atomic_write_bytes(path, data, fsync=False)
        web_seeds = []
        if self.web_seeds:
            web_seeds = _web_seeds(self.web_seeds, info.name, shards[0], timeout)
            if not (web_seeds or can_find_peers(data, torrent)):
                why = "no way to find peers here (no peers, trackers, DHT or web seeds)"
                return RouteResult(failed={s.name: _torrent_error(s.name, why) for s in shards})
        source = f"torrent:{info.infohash}"
        reported = 0

        def counted(n: int) -> None:
            nonlocal reported
            reported += n
            progress(n)

        def delivered(shard: Shard, path: Path) -> None:
            if on_shard:
                on_shard(shard, Delivered(path, source, shard.size))

        got = fetch_from_swarm(
            data,
            self.manifest,
            self.split,
            shards,
            dest,
            torrent,
            web_seeds=web_seeds,
            progress=counted if progress else None,
            trust_existing=trust_existing,
            on_shard=delivered,
        )
        if progress:  # count what was delivered, not the pieces of what was not (HTTP counts those itself)
            progress(sum(s.size for s in shards if s.name in got.done) - reported)
        return RouteResult(
            done={s.name: Delivered(got.done[s.name], source, s.size) for s in shards if s.name in got.done},
            failed={
                s.name: _torrent_error(s.name, got.failed.get(s.name, "not delivered"))
                for s in shards
                if s.name not in got.done
            },
            problems=list(got.problems),
        )


def _torrent_error(name: str, reason: str) -> FetchError:
    failure = SourceFailure("torrent", reason)
    return FetchError(str(failure), shard=name, failures=[failure])


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
