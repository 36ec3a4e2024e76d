"""One exception family for hivetrain; the CLI prints these as one line and exits 1."""


class HivetrainError(Exception):
    """Base class: a problem the user can act on."""


class PeerError(HivetrainError):
    """The DHT or other peers cannot be reached, or refuse us (clock skew, NAT)."""


class CheckpointError(HivetrainError):
    """A checkpoint that cannot be read or does not match the run (other dataset or model)."""


class DataError(HivetrainError):
    """Shards that cannot be obtained or read."""
