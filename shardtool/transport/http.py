"""Verified, resumable shard downloads over HTTP with retries, backoff and mirror failover.

One shard at a time (callers run several in threads): the body streams into
`<dest>/.shardtool-partial/<name>.part` while its sha256 is computed, and the file is renamed to its final
name only when size and hash match the manifest. An interrupted download resumes with a Range request
(the prefix on disk is re-hashed first); a server that ignores Range answers 200 and the file restarts.
Timeouts, resets, cut bodies, 429 and 5xx are retried on the same mirror with exponential backoff;
other failures and bad bytes move on to the next mirror. Each failing mirror is named in the result, so
a corrupt mirror next to a good one is reported even though the shard arrives intact.

Written on the standard library's http.client rather than httpx because its raw chunks can go
straight to the hash and to `writev`: a batch is received while a helper thread hashes and writes the
previous one, and nothing is copied in Python. On loopback that runs at curl's speed with four jobs,
where an httpx loop (h11 copies every chunk twice) reached a third of it.

Files are not fsynced unless asked (`HttpOptions.fsync`), like curl and aria2c: what matters here is
that a final name only ever holds verified bytes, and that holds either way; after a power failure,
`fetch --recheck` re-verifies what the disk kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import random
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import FetchError, SourceFailure
from ..fsutil import fsync_dir
from ..manifest import Shard, human_bytes
from ..verify import verify_shard
from .options import HttpOptions
from .paths import partial_dir, shard_url

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with byte deltas as data is accepted (negative when a partial file is thrown away)."""

MIN_PROGRESS = 64 << 10  # an attempt that got at least this much does not use up a retry
READ_SIZE = 1 << 20  # most bytes asked of one read; a read returns what one recv() got
MAX_CHUNKS = 512  # per writev (the system's limit is 1024)


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


class _Partial:
    """The `.part` file of a download and the sha256 of what it holds so far.

    `receive` gathers the chunks of a response body into batches; a one-thread executor hashes and
    writes each batch while the next one arrives, so the three overlap without copying the data.
    """

    def __init__(self, path: Path, batch: int, progress: Progress | None):
        self.path = path
        self.batch = batch
        self.progress = progress
        self.size = 0  # bytes hashed and written
        self.received = 0  # bytes that came over the network in this session, kept or not
        self.digest = hashlib.sha256()
        self._pending: Future | None = None
        self._pool = ThreadPoolExecutor(1, "shard-writer")
        self._fd: int | None = None

    def open(self, expected: int) -> None:
        """Open (creating it if needed) and hash what an earlier attempt left; drop an oversized one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size > expected:
            os.ftruncate(self._fd, 0)
            return
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                self.digest.update(block)
                self.size += len(block)
        if self.progress and self.size:
            self.progress(self.size)

    def receive(self, resp: http.client.HTTPResponse, expected: int, stop: threading.Event) -> None:
        """Append the body of `resp`; raises _SourceFailed past `expected` bytes in all.

        Reads with `read1` (one system call each) so that what arrived before an error is kept and the
        next attempt resumes right after it.
        """
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := resp.read1(READ_SIZE):
                if stop.is_set():
                    raise FetchError("interrupted")
                chunks.append(chunk)
                size += len(chunk)
                if size >= self.batch or len(chunks) >= MAX_CHUNKS:
                    self._submit(chunks, size, expected)
                    chunks, size = [], 0
        finally:
            if chunks:
                self._submit(chunks, size, expected)

    def _submit(self, chunks: list[bytes], size: int, expected: int) -> None:
        self.flush()
        if self.size + size > expected:
            self.restart()
            raise _SourceFailed(f"sends more than the manifest's {expected} bytes")
        self._pending = self._pool.submit(self._write, chunks, size)

    def _write(self, chunks: list[bytes], size: int) -> None:
        for chunk in chunks:
            self.digest.update(chunk)
        written = os.writev(self._fd, chunks)
        if written < size:  # short write (rare on regular files): finish it plainly
            rest = memoryview(b"".join(chunks))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        self.size += size
        self.received += size
        if self.progress:
            self.progress(size)

    def flush(self) -> None:
        """Wait until everything received is hashed and written."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except OSError as e:
                raise FetchError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def restart(self) -> None:
        """Throw away what is there (the server ignored our Range, or sent bad bytes)."""
        self.flush()
        if self.progress and self.size:
            self.progress(-self.size)
        os.ftruncate(self._fd, 0)
        self.digest = hashlib.sha256()
        self.size = 0

    def close(self, *, sync: bool = False) -> None:
        if self._fd is None:
            return
        try:
            self.flush()
            if sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
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


class HttpFetcher:
    """Downloads shards from HTTP mirrors; one instance may be shared by the threads of a fetch."""

    def __init__(self, options: HttpOptions | None = None):
        self.options = options or HttpOptions()
        self._ssl: ssl.SSLContext | None = None  # made on first use: loading the CA store takes 0.1 s
        self._random = random.Random()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Make downloads in progress give up at their next read (partial files stay for a resume)."""
        self._stop.set()

    def close(self) -> None:
        """Nothing to release (one connection per request); kept for use as a context manager."""

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
            FetchError: no mirror gave good bytes; its `failures` name each mirror's (and so does the
                message).
        """
        final = dest / shard.name
        with shard_lock(dest, shard.name):
            if verify_shard(final, shard, sha256=not trust_existing) is None:
                return ShardReport(shard.name, final, None)
            if not mirrors:
                raise FetchError("no HTTP source to fetch it from", shard=shard.name)
            failures: list[SourceFailure] = []
            for base in mirrors:
                url = shard_url(base, shard.name)
                partial = _Partial(partial_dir(dest) / f"{shard.name}.part", self.options.batch, progress)
                try:
                    partial.open(shard.size)
                    resumed_from = partial.size
                    self._download(url, shard, partial)
                    partial.close(sync=self.options.fsync)
                except _SourceFailed as e:
                    partial.close()
                    failures.append(SourceFailure(url, str(e)))
                    log.warning("%s: %s", url, e)
                    continue
                except BaseException:
                    partial.close()
                    raise
                os.replace(partial.path, final)
                if self.options.fsync:
                    fsync_dir(dest)
                problems = tuple(map(str, failures))
                return ShardReport(shard.name, final, url, partial.received, resumed_from, problems)
            reason = f"no source gave good bytes ({'; '.join(map(str, failures))})"
            raise FetchError(reason, shard=shard.name, failures=failures)

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
                # an attempt that moved the file on starts the count afresh (each such one advances it by
                # MIN_PROGRESS at least, so this ends); only attempts that got (almost) nothing add up
                failures = 0 if partial.size - before >= MIN_PROGRESS else failures + 1
                if failures > self.options.retries:
                    raise _SourceFailed(f"{e} (gave up after {failures} tries)") from None
                delay = min(self.options.max_backoff, self.options.backoff * 2 ** max(failures - 1, 0))
                delay *= self._random.uniform(0.5, 1.0)
                log.info("%s: %s; retrying in %.1f s from byte %d", url, e, delay, partial.size)
                if self._stop.wait(delay):
                    raise FetchError("interrupted") from None
                continue
            if partial.digest.hexdigest() == shard.sha256:
                return
            partial.restart()
            if not inherited:
                raise _SourceFailed(f"sha256 mismatch (expected {shard.sha256[:12]}…)")
            log.info("%s: sha256 mismatch after resuming at byte %d; fetching the whole file", url, inherited)
            inherited = 0

    def _request(self, url: str, headers: dict[str, str]):
        """GET `url` (following up to five redirects); returns the connection and the response."""
        for _ in range(6):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _SourceFailed(f"not an http(s) URL: {url}")
            if parts.scheme == "https":
                self._ssl = self._ssl or ssl.create_default_context()
                conn = http.client.HTTPSConnection(
                    parts.hostname, parts.port, timeout=self.options.timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.options.timeout)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers={"Accept-Encoding": "identity", **headers})
                resp = conn.getresponse()
            except (ConnectionRefusedError, socket.gaierror) as e:
                conn.close()
                raise _SourceFailed(f"cannot connect ({e.strerror or e})") from None
            except BaseException:
                conn.close()
                raise
            location = resp.getheader("Location")
            if resp.status in (301, 302, 303, 307, 308) and location:
                conn.close()
                url = urllib.parse.urljoin(url, location)
                continue
            return conn, resp
        raise _SourceFailed("too many redirects")

    def _attempt(self, url: str, shard: Shard, partial: _Partial) -> None:
        """One request: append the rest of the shard to `partial`, or raise."""
        if partial.size == shard.size:
            return
        headers = {"Range": f"bytes={partial.size}-"} if partial.size else {}
        conn = None
        try:
            conn, resp = self._request(url, headers)
            self._check_response(url, resp, shard, partial)
            partial.receive(resp, shard.size, self._stop)
        except TimeoutError:
            raise _Transient("timed out") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        finally:
            try:
                partial.flush()
            finally:
                if conn is not None:
                    conn.close()
        if partial.size < shard.size:
            raise _Transient(f"connection closed at byte {partial.size} of {shard.size}")

    def _check_response(
        self, url: str, resp: http.client.HTTPResponse, shard: Shard, partial: _Partial
    ) -> None:
        status = resp.status
        if status == 206:
            start, total = _content_range(resp.getheader("Content-Range", ""))
            if total is not None and total != shard.size:
                raise _SourceFailed(f"has {human_bytes(total)} ({total} B), the manifest says {shard.size} B")
            if start != partial.size:
                partial.restart()
                raise _Transient(
                    f"answered Range bytes={partial.size}- with {resp.getheader('Content-Range')}"
                )
            return
        if status == 200:
            if partial.size:
                log.info("%s ignores Range: restarting from byte 0", url)
                partial.restart()
            length = resp.getheader("Content-Length")
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
