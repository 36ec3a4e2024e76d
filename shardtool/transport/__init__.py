"""Moving shards between peers, verified against the manifest: HTTP mirrors and BitTorrent.

Where things live:
    fetch.py    `fetch_shard` (one shard, on demand: what hivetrain's cache calls) and `fetch_shards`
                (what `shardtool fetch` runs: selection, parallel jobs, progress, summary)
    routes.py   the routes (HTTP mirrors, a split's torrent) and the one rule that orders them for a `via`
    options.py  every transport setting with its default (HTTP, torrent, fetch), free of libtorrent
    http.py     verified, resumable HTTP downloads with retries, backoff and mirror failover
    serve.py    `ShardServer`: the HTTP server of a shard folder (manifest, shards, torrents, web seeds)
    torrent.py  deterministic torrent creation, loading and checking, libtorrent session settings
    swarm.py    downloading selected shards from a swarm and web seeds, checked by sha256 as well
    seed.py     `Seeder`: verifies local shards (with safe fast resume) and seeds them
    paths.py    names shared by all of these: torrent names, shard URLs, the partial-download folder

Nothing here writes an unverified file under a shard's final name: downloads grow in
`<dest>/.shardtool-partial/` and are renamed into place once their size and sha256 match; files already
there are checked with `shardtool.verify.verify_shard`. A shard no source could give raises (or is
reported with) a `FetchError` whose `failures` name each source's problem.
libtorrent is imported only by the torrent modules, so HTTP-only users never load it.
"""

from .fetch import FetchSummary, fetch_shard, fetch_shards, select_shards
from .options import FetchOptions, HttpOptions

__all__ = ["FetchOptions", "FetchSummary", "HttpOptions", "fetch_shard", "fetch_shards", "select_shards"]
