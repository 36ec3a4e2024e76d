"""What `shardtool fetch` does: choose shards, get them over the routes of `routes.py`, report.

`fetch_shard` is the one-shard entry point that hivetrain's cache calls; `fetch_shards` runs a whole
selection with a progress bar and returns a `FetchSummary`. Both take the routes `routes.order_routes`
names for their `via` (HTTP mirrors, the split's torrent) and run them with `routes.run_routes`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import FetchError, ManifestError, ShardtoolError
from ..fsutil import atomic_write_text
from ..manifest import MANIFEST_NAME, Manifest, Shard, human_bytes, is_url, load
from ..verify import verify_shard
from .http import Progress
from .options import FetchOptions, HttpOptions, TorrentOptions
from .routes import VIAS, Delivered, http_sources, routes_for, run_routes

log = logging.getLogger(__name__)


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
    torrent_options: TorrentOptions | None = None,
) -> Path:
    """Obtain one verified shard at `dest_dir/<shard.name>` and return its path.

    A copy already there is returned at once (size check; sha256 too with `trust_existing=False`).
    Nothing unverified ever sits under the final name. Safe to call from several threads and processes.

    Args:
        via: "http", "torrent", or "auto" (on demand: HTTP mirrors first, then the torrent).
        mirrors: extra HTTP base URLs, tried before the manifest's own.
        timeout: HTTP connect/read timeout, and the swarm's stall timeout unless `torrent_options` say.
        peers: HOST:PORT BitTorrent peers for the torrent route.
        torrent_options: the torrent route's settings (`peers` are added to them).

    Raises:
        FetchError: no source gave good bytes; its `failures` name each source's (and so does the
            one-line message).
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {VIAS}, not {via!r}")
    dest = Path(dest_dir)
    final = dest / shard.name
    if verify_shard(final, shard, sha256=not trust_existing) is None:
        return final
    split, _ = manifest.find_shard(shard.name)
    torrent = torrent_options or TorrentOptions(stall_timeout=timeout)
    options = FetchOptions(
        via=via,
        mirrors=tuple(mirrors),
        jobs=1,
        http=HttpOptions(timeout=timeout),
        torrent=dataclasses.replace(torrent, peers=(*torrent.peers, *peers)),
    )
    routes = routes_for(manifest, split, options, on_demand=True)
    outcome = run_routes(routes, [shard], dest, via=via, progress=progress, trust_existing=trust_existing)
    if shard.name in outcome.done:
        return outcome.done[shard.name].path
    raise outcome.failed[shard.name]


# ---- many shards -------------------------------------------------------------------------------


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

    def delivered(shard: Shard, got: Delivered) -> None:
        summary.fetched[shard.name] = got.source
        summary.bytes += got.downloaded
        bar.shard_done()

    try:
        for split, todo in missing.items():
            outcome = run_routes(
                routes_for(manifest, split, options),
                todo,
                dest,
                via=options.via,
                progress=bar.update,
                trust_existing=not options.recheck,
                on_shard=delivered,
            )
            summary.problems += outcome.problems
            summary.failed.update((name, e.reason) for name, e in outcome.failed.items())
    finally:
        bar.close()
    summary.seconds = time.monotonic() - start
    return summary


def _missing(chosen: list[Shard], dest: Path, *, recheck: bool, jobs: int) -> list[Shard]:
    """The shards of `chosen` without a verified copy in `dest` (hashed in parallel with --recheck)."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        problems = list(pool.map(lambda s: verify_shard(dest / s.name, s, sha256=recheck), chosen))
    return [s for s, problem in zip(chosen, problems) if problem is not None]


# ---- the destination folder --------------------------------------------------------------------


def prepare_destination(manifest: Manifest, dest: Path) -> None:
    """Write the manifest into `dest` (so that it can be served, seeded and verified later).

    Refuses a folder whose manifest describes other data, rather than mixing two datasets. Not fsynced:
    on ext4 an fsync waits for every dirty block of the file system (seconds after a large fetch), and
    a manifest lost to a power failure is simply written again by the next fetch.
    """
    target = dest / MANIFEST_NAME
    origin = manifest.origin
    if origin and not is_url(origin) and Path(origin).resolve() == target.resolve():
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
