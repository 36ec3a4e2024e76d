"""Names shared by every transport: torrent names, URLs of shards, and where partial downloads live.

Kept free of heavy imports so that the server and the HTTP client do not load libtorrent.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..manifest import Manifest

PARTIAL_DIR = ".shardtool-partial"
"""Hidden folder inside a destination that holds downloads in progress (never under the final name)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def default_torrent_name(dataset: str, split: str) -> str:
    """`<dataset>-<split>` reduced to characters every client and file system accepts."""
    name = _UNSAFE.sub("_", f"{dataset}-{split}").strip("._-")
    return name or f"shards-{split}"


def torrent_name(manifest: Manifest, split: str) -> str:
    """The torrent name of a split: the recorded one, else the deterministic default."""
    info = manifest.sources.torrents.get(split)
    return info.name if info is not None else default_torrent_name(manifest.dataset, split)


def base_url(url: str) -> str:
    """A mirror's base URL with exactly one trailing slash (shard URL = base + name)."""
    return url.rstrip("/") + "/"


def shard_url(base: str, name: str) -> str:
    return base_url(base) + name


def partial_dir(dest: Path) -> Path:
    return dest / PARTIAL_DIR
