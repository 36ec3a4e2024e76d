"""Verified, resumable shard downloads over HTTP with retries, backoff and mirror failover.

One shard at a time (callers run several in threads): the body streams into
`<dest>/.shardtool-partial/<name>.part` while its sha256 is computed, and the file is renamed to its final
name only when size and hash match the manifest. An interrupted download resumes with a Range request
(the prefix on disk is re-hashed first); a server that ignores Range answers 200 and the file restarts.
Timeouts, resets, cut bodies, 429 and 5xx are retried on the same mirror with exponential backoff;
other failures and bad bytes move on to the next mirror. Each failing mirror is named in the result, so
a corrupt mirror next to a good one is reported even though the shard arrives intact.

httpx does the HTTP; what is written by hand is the pipelining: hashing and writing run in a helper
thread on batches of a few MiB while the next batch arrives, which on loopback nearly doubles the
throughput of a loop that receives, hashes and writes in turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..errors import FetchError
from ..fsutil import fsync_dir, sha256_file
from ..manifest import Shard, human_bytes
from .paths import partial_dir, shard_url

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with byte deltas as data is accepted (negative when a partial file is thrown away)."""

MIN_PROGRESS = 1 << 20  # an attempt that got at least this much does not use up a retry


@dataclass(frozen=True)
class HttpOptions:
    """How hard to try each mirror.

    Attributes:
        timeout: seconds allowed for connecting and between two reads.
        retries: further tries of one mirror after transient failures that brought no data.
        backoff: first delay before a retry; doubled each time (with jitter) up to `max_backoff`.
        batch: bytes hashed and written together in the helper thread.
    """

    timeout: float = 30.0
    retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 15.0
    batch: int = 4 << 20


@dataclass(frozen=True)
class ShardReport:
    """What happened to one shard: where it came from, how much was moved, and which mirrors failed."""

    name: str
    path: Path
    source: str | None  # URL that delivered it; None when a verified copy was already there
    downloaded: int = 0
    resumed_from: int = 0
    problems: tuple[str, ...] = ()


class _Transient(Exception):
    """Worth retrying on the same mirror (timeout, reset, cut body, 5xx)."""


class _SourceFailed(Exception):
    """This mirror will not give good bytes for this shard; try the next one."""


@dataclass
class _Partial:
    """The `.part` file of a download, with the sha256 of what it holds so far.

    Appends are batched and handed to a one-thread executor that hashes and writes them while the caller
    receives the next batch.
    """

    path: Path
    batch_size: int
    progress: Progress | None
    size: int = 0  # bytes hashed and written
    accepted: int = 0  # bytes appended, some perhaps still batched
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    _file: object = None
    _batch: bytearray = field(default_factory=bytearray)
    _pending: Future | None = None
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "shard-writer"))

    def open(self, expected: int) -> None:
        """Open (creating it if needed) and hash what an earlier attempt left; drop an oversized one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - closed in close()
        self.digest = hashlib.sha256()
        self.size = 0
        have = os.fstat(self._file.fileno()).st_size
        if have > expected:
            self._file.truncate(0)
            self.accepted = 0
            return
        self._file.seek(0)
        while block := self._file.read(1 << 20):
            self.digest.update(block)
            self.size += len(block)
        self.accepted = self.size
        if self.progress and self.size:
            self.progress(self.size)

    def append(self, chunk: bytes) -> None:
        self._batch += chunk
        self.accepted += len(chunk)
        if len(self._batch) >= self.batch_size:
            self._submit()

    def _submit(self) -> None:
        data, self._batch = bytes(self._batch), bytearray()
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._write, data)

    def _write(self, data: bytes) -> None:
        self.digest.update(data)
        self._file.write(data)
        self.size += len(data)
        if self.progress:
            self.progress(len(data))

    def flush(self) -> None:
        """Wait until everything appended is hashed and on its way to disk."""
        if self._batch:
            self._submit()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def restart(self) -> None:
        """Throw away what is there (the server ignored our Range, or sent bad bytes)."""
        self.flush()
        if self.progress and self.size:
            self.progress(-self.size)
        self._file.truncate(0)
        self.digest = hashlib.sha256()
        self.size = self.accepted = 0

    def close(self, *, sync: bool = False) -> None:
        if self._file is None:
            return
        with contextlib.suppress(Exception):
            self.flush()
        if sync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self._pool.shutdown()


@contextlib.contextmanager
def shard_lock(dest: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on one shard of `dest`, across threads and processes."""
    folder = partial_dir(dest)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def verified_copy(path: Path, shard: Shard, *, trust_existing: bool = True) -> bool:
    """Does `path` hold this shard? Size always; sha256 too unless `trust_existing`.

    Files under a final name were verified before they were renamed there, so the size check catches
    what usually goes wrong (a truncated copy); a full check is for when the disk itself is in doubt.
    """
    try:
        if path.stat().st_size != shard.size:
            return False
    except OSError:
        return False
    return trust_existing or sha256_file(path) == shard.sha256


class HttpFetcher:
    """Downloads shards from HTTP mirrors; one instance is shared by all threads of a fetch."""

    def __init__(self, options: HttpOptions = HttpOptions()):
        self.options = options
        self._client = httpx.Client(
            timeout=httpx.Timeout(options.timeout),
            follow_redirects=True,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            headers={"Accept-Encoding": "identity"},
        )
        self._random = random.Random()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpFetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(
        self,
        shard: Shard,
        mirrors: Sequence[str],
        dest: Path,
        *,
        progress: Progress | None = None,
        trust_existing: bool = True,
    ) -> ShardReport:
        """Place a verified copy of `shard` at `dest/<name>`, trying `mirrors` (base URLs) in order.

        Raises:
            FetchError: no mirror gave good bytes; the message lists each mirror's failure.
        """
        final = dest / shard.name
        with shard_lock(dest, shard.name):
            if verified_copy(final, shard, trust_existing=trust_existing):
                return ShardReport(shard.name, final, None)
            if not mirrors:
                raise FetchError(f"{shard.name}: no HTTP source to fetch it from")
            problems: list[str] = []
            for base in mirrors:
                url = shard_url(base, shard.name)
                partial = _Partial(partial_dir(dest) / f"{shard.name}.part", self.options.batch, progress)
                try:
                    partial.open(shard.size)
                    resumed_from = partial.size
                    self._download(url, shard, partial)
                    partial.close(sync=True)
                except _SourceFailed as e:
                    partial.close()
                    problems.append(f"{url}: {e}")
                    log.warning("%s: %s", url, e)
                    continue
                except BaseException:
                    partial.close()
                    raise
                os.replace(partial.path, final)
                fsync_dir(dest)
                return ShardReport(
                    shard.name, final, url, shard.size - resumed_from, resumed_from, tuple(problems)
                )
            raise FetchError(f"{shard.name}: no source gave good bytes ({'; '.join(problems)})")

    def _download(self, url: str, shard: Shard, partial: _Partial) -> None:
        """Complete `partial` from one mirror, retrying transient failures; verify it at the end.

        A hash mismatch after resuming a prefix left by an earlier attempt may be that prefix's fault,
        so the mirror gets one more try with the whole file before it is blamed.
        """
        inherited = partial.size
        failures = 0
        while True:
            before = partial.size
            try:
                self._attempt(url, shard, partial)
            except _Transient as e:
                if partial.size - before < MIN_PROGRESS:
                    failures += 1
                if failures > self.options.retries:
                    raise _SourceFailed(f"{e} (gave up after {failures} tries)") from None
                delay = min(self.options.max_backoff, self.options.backoff * 2 ** max(failures - 1, 0))
                delay *= self._random.uniform(0.5, 1.0)
                log.info("%s: %s; retrying in %.1f s from byte %d", url, e, delay, partial.size)
                time.sleep(delay)
                continue
            if partial.digest.hexdigest() == shard.sha256:
                return
            partial.restart()
            if not inherited:
                raise _SourceFailed(f"sha256 mismatch (expected {shard.sha256[:12]}…)")
            log.info("%s: sha256 mismatch after resuming at byte %d; fetching the whole file", url, inherited)
            inherited = 0

    def _attempt(self, url: str, shard: Shard, partial: _Partial) -> None:
        """One request: append the rest of the shard to `partial`, or raise."""
        if partial.size == shard.size:
            return
        headers = {"Range": f"bytes={partial.size}-"} if partial.size else {}
        try:
            with self._client.stream("GET", url, headers=headers) as resp:
                self._check_response(resp, shard, partial)
                for chunk in resp.iter_raw():
                    if partial.accepted + len(chunk) > shard.size:
                        partial.restart()
                        raise _SourceFailed(f"sends more than the manifest's {shard.size} bytes")
                    partial.append(chunk)
                partial.flush()
        except httpx.TimeoutException as e:
            raise _Transient(f"timed out ({type(e).__name__})") from None
        except (httpx.TransportError, httpx.DecodingError) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        finally:
            partial.flush()
        if partial.size < shard.size:
            raise _Transient(f"connection closed at byte {partial.size} of {shard.size}")

    def _check_response(self, resp: httpx.Response, shard: Shard, partial: _Partial) -> None:
        status = resp.status_code
        if status == 206:
            start, total = _content_range(resp.headers.get("content-range", ""))
            if total is not None and total != shard.size:
                raise _SourceFailed(f"has {human_bytes(total)} ({total} B), the manifest says {shard.size} B")
            if start != partial.size:
                partial.restart()
                raise _Transient(
                    f"answered Range bytes={partial.size}- with {resp.headers.get('content-range')}"
                )
            return
        if status == 200:
            if partial.size:
                log.info("%s ignores Range: restarting from byte 0", resp.url)
                partial.restart()
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != shard.size:
                raise _SourceFailed(f"has {length} B, the manifest says {shard.size} B")
            return
        if status == 416:
            partial.restart()
            raise _Transient("HTTP 416 for our Range (the partial file is stale)")
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}")
        raise _SourceFailed(f"HTTP {status}")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); unknown parts are None."""
    try:
        _, spec = value.split(" ", 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        return None, None
