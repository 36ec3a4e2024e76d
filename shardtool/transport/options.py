"""The settings of every transport, with their defaults, in one place.

Plain dataclasses with no heavy imports, so that a caller can describe a torrent fetch (and pass it down
to code that may never use it) without loading libtorrent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HttpOptions:
    """How hard to try each mirror.

    Attributes:
        timeout: seconds allowed for connecting and between two reads.
        retries: further tries of one mirror after transient failures that brought no data.
        backoff: first delay before a retry; doubled each time (with jitter) up to `max_backoff`.
        batch: bytes received before they are handed to the helper thread to hash and write.
        fsync: flush each shard to the disk before renaming it into place.
    """

    timeout: float = 30.0
    retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 15.0
    batch: int = 4 << 20
    fsync: bool = False


@dataclass(frozen=True)
class TorrentOptions:
    """Session settings for seeding and fetching.

    Attributes:
        listen: HOST:PORT to accept peers on (port 0: any free port).
        dht, lsd: the DHT and local peer discovery (off: only trackers and given peers).
        port_mapping: UPnP and NAT-PMP on the router.
        trackers: announce URLs added to every torrent.
        peers: HOST:PORT of peers to connect to directly.
        utp: uTP as well as TCP; None means off on loopback (uTP there is ten times slower) and on elsewhere.
        stall_timeout: a fetch gives up on its remaining shards after this long without data.
        web_seed_failures: errors or bad pieces after which a fetch drops a web seed.
    """

    listen: str = "127.0.0.1:0"
    dht: bool = False
    lsd: bool = False
    port_mapping: bool = False
    trackers: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    utp: bool | None = None
    stall_timeout: float = 60.0
    web_seed_failures: int = 3


@dataclass(frozen=True)
class FetchOptions:
    """How `fetch_shards` (and, built from its arguments, `fetch_shard`) gets shards.

    Attributes:
        via: "auto", "http" or "torrent" (see `routes.order_routes`).
        mirrors: extra HTTP base URLs (`--from`), tried before the manifest's own.
        jobs: shards downloaded at once over HTTP.
        recheck: hash shards already present instead of trusting their size.
        progress: show a progress bar on stderr (None: only on a terminal).
        http: the HTTP route's settings.
        torrent: the torrent route's settings (None: the defaults).
    """

    via: str = "auto"
    mirrors: tuple[str, ...] = ()
    jobs: int = 4
    recheck: bool = False
    progress: bool | None = None
    http: HttpOptions = field(default_factory=HttpOptions)
    torrent: TorrentOptions | None = None
