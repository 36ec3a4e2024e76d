"""One exception family for shardtool; the CLI prints these as one line and exits 1."""


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


class FetchError(ShardtoolError):
    """Shards that could not be fetched and verified from any source."""
