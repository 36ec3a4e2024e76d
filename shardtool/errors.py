"""One exception family for shardtool; the CLI prints these as one line and exits 1."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class ShardtoolError(Exception):
    """Base class: a problem the user can act on (bad input, failed check, unreachable source)."""


class ManifestError(ShardtoolError):
    """A manifest that cannot be read, or that fails validation."""


class LayoutError(ShardtoolError):
    """A dataset folder that matches no known layout, or is missing a file its layout needs."""


class BuildError(ShardtoolError):
    """A build that cannot proceed (empty split, unknown label, --strict and a bad file, ...)."""


class VerifyError(ShardtoolError):
    """Shards that do not match the manifest (size, hash or sample count)."""


@dataclass(frozen=True)
class SourceFailure:
    """What one source (a mirror's shard URL, "torrent", a .torrent location) did wrong."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class FetchError(ShardtoolError):
    """Shards that could not be fetched and verified from any source.

    The message is one line, `<shard>: <reason>` when the error is about one shard; the parts are kept
    as attributes so that callers never take the message apart.

    Attributes:
        reason: the message without the shard's name.
        shard: the shard that could not be had (None for a manifest, a torrent or a whole fetch).
        failures: what each source tried did wrong, in the order they were tried.
    """

    def __init__(self, reason: str, *, shard: str | None = None, failures: Iterable[SourceFailure] = ()):
        super().__init__(f"{shard}: {reason}" if shard else reason)
        self.reason = reason
        self.shard = shard
        self.failures = tuple(failures)
