"""Reproducible tar shards: fixed header fields, hashed while written, renamed into place when complete.

Built on webdataset's TarWriter (USTAR, members in sorted extension order). We fix everything that
could vary between machines (mtime 0, uid/gid 0, empty user and group names, mode 0444), so the same
samples in the same order always give the same bytes, and hash the stream as it is written so no shard
is read twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import webdataset as wds

from .fsutil import FILE_MODE, fsync_dir
from .manifest import Shard


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Write one shard. Nothing appears under the final name until `close()` succeeds.

    >>> with ShardWriter("out/train-000000.tar") as w:
    ...     w.write("n01440764_10026", {"jpg": jpeg_bytes, "cls": b"0", "json": b"{}"})
    >>> w.shard  # Shard(name, size, sha256, num_samples)
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, FILE_MODE)
        self._raw = os.fdopen(fd, "wb", buffering=1 << 20)
        self._hashing = _HashingFile(self._raw)
        self._tar = wds.TarWriter(self._hashing, user="", group="", mode=0o444, mtime=0, encoder=False)
        self.num_samples = 0
        self.shard: Shard | None = None

    @property
    def bytes_written(self) -> int:
        return self._hashing.size

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample: `fields` maps extensions ("jpg", "cls", "json") to their bytes."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        self._tar.write({"__key__": key, **fields})
        self.num_samples += 1

    def close(self) -> Shard:
        """Finish the tar, sync it, and rename it into place; returns its manifest entry."""
        self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
        self._raw.flush()
        if self.fsync:
            os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp, self.path)
        if self.fsync:
            fsync_dir(self.path.parent)
        self.shard = Shard(
            self.path.name, self._hashing.size, self._hashing.digest.hexdigest(), self.num_samples
        )
        return self.shard

    def abort(self) -> None:
        """Drop the partial shard."""
        with contextlib.suppress(Exception):
            self._raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
