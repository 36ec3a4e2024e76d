"""BitTorrent basics shared by seeding and fetching: creating torrents, loading them, safe sessions.

A split's torrent is a plain v1 multi-file torrent named `<dataset>-<split>` whose files are the split's
shards in sorted order, with a piece size that depends only on the split's total size and no creation
date or creator: the same shards always give the same info-hash (the one `mktorrent -l <log2 piece>
-n <name>` gives for a folder of those files), so independent builders of a dataset join one swarm.
v1 only, because hybrid torrents add padding files that break aria2c's web-seed downloads.

Shards lie flat beside the manifest while a multi-file torrent names them `<name>/<shard>`; sessions
therefore add torrents with renamed files, and creation hashes the pieces here rather than with
`set_piece_hashes` (which reads `<dir>/<name>/<shard>`), checking every shard's sha256 in the same pass.

A default `lt.session()` listens on every interface with DHT, LSD, UPnP and NAT-PMP on; sessions here
are always built from `TorrentOptions`, with everything that reaches beyond the given peers off unless
asked for.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import libtorrent as lt
from tqdm import tqdm

from .. import __version__
from ..errors import FetchError, ShardtoolError, SourceFailure, VerifyError
from ..fsutil import atomic_write_bytes
from ..manifest import Manifest, Shard, TorrentInfo, is_url, load
from .options import TorrentOptions
from .paths import base_url, default_torrent_name

log = logging.getLogger(__name__)

MIN_PIECE = 256 << 10
MAX_PIECE = 16 << 20
TARGET_PIECES = 4096


def parse_hostport(text: str, what: str = "address") -> tuple[str, int]:
    """`127.0.0.1:6881` or `[::1]:6881` -> (host, port); a ShardtoolError naming `what` otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ShardtoolError(f"{what} {text!r} is not HOST:PORT")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def session_settings(options: TorrentOptions, *, seeding: bool = False) -> dict:
    """The settings pack for a session; see the module docstring for why nothing is left default."""
    host, port = parse_hostport(options.listen, "listen address")
    utp = options.utp if options.utp is not None else not _is_loopback(host)
    listen_host = f"[{host}]" if ":" in host else host
    settings = lt.high_performance_seed() if seeding else {}
    settings.update(
        {
            "listen_interfaces": f"{listen_host}:{port}",
            "enable_dht": options.dht,
            "enable_lsd": options.lsd,
            "enable_upnp": options.port_mapping,
            "enable_natpmp": options.port_mapping,
            "enable_outgoing_utp": utp,
            "enable_incoming_utp": utp,
            "allow_multiple_connections_per_ip": True,
            "announce_to_all_trackers": True,
            "announce_to_all_tiers": True,
            "user_agent": f"shardtool/{__version__} libtorrent/{lt.__version__}",
            "urlseed_wait_retry": 5,
            "alert_queue_size": 100_000,
            "alert_mask": (
                lt.alert_category.error
                | lt.alert_category.status
                | lt.alert_category.storage
                | lt.alert_category.file_progress
                | lt.alert_category.peer
                | lt.alert_category.tracker
            ),
        }
    )
    if not options.dht:
        settings["dht_bootstrap_nodes"] = ""
    return settings


def open_session(options: TorrentOptions, *, seeding: bool = False) -> lt.session:
    """A session built from `options`, listening where asked; the caller deletes it to shut it down."""
    session = lt.session(session_settings(options, seeding=seeding))
    if not session.is_listening() and parse_hostport(options.listen)[1] != 0:
        raise ShardtoolError(f"cannot listen on {options.listen} (in use, or not an address of this host?)")
    return session


def connect_peers(handle: lt.torrent_handle, peers: Sequence[str]) -> None:
    for peer in peers:
        handle.connect_peer(parse_hostport(peer, "peer"))


def listen_address(session: lt.session, options: TorrentOptions) -> str:
    """HOST:PORT peers can add (`--peer`), with the port actually bound."""
    host, _ = parse_hostport(options.listen)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{session.listen_port()}"


# ---- creating ---------------------------------------------------------------------------------


def piece_size_for(total_bytes: int) -> int:
    """The fixed rule: the smallest power of two from 256 KiB up giving at most 4096 pieces, at most
    16 MiB. It depends only on the total, so independent builders agree."""
    size = MIN_PIECE
    while size < MAX_PIECE and total_bytes > size * TARGET_PIECES:
        size *= 2
    return size


def _hash_pieces(shards: Sequence[Shard], directory: Path, piece_size: int, desc: str) -> list[bytes]:
    """SHA-1 of each piece over the concatenated shards; also checks each shard's size and sha256."""
    pieces: list[bytes] = []
    piece = hashlib.sha1()
    filled = 0
    total = sum(s.size for s in shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None) as bar:
        for shard in shards:
            path = directory / shard.name
            try:
                if path.stat().st_size != shard.size:
                    raise VerifyError(f"{path}: {path.stat().st_size} bytes, the manifest says {shard.size}")
                f = open(path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                raise VerifyError(f"{path}: missing (a torrent needs every shard of the split)") from None
            whole = hashlib.sha256()
            with f:
                while block := f.read(1 << 20):
                    whole.update(block)
                    bar.update(len(block))
                    view = memoryview(block)
                    while view:
                        take = min(piece_size - filled, len(view))
                        piece.update(view[:take])
                        filled += take
                        view = view[take:]
                        if filled == piece_size:
                            pieces.append(piece.digest())
                            piece, filled = hashlib.sha1(), 0
            if whole.hexdigest() != shard.sha256:
                raise VerifyError(f"{path}: sha256 differs from the manifest (re-fetch or rebuild it)")
    if filled:
        pieces.append(piece.digest())
    return pieces


def create_torrent(
    manifest: Manifest,
    split: str,
    directory: Path,
    *,
    web_seeds: Sequence[str] = (),
    trackers: Sequence[str] = (),
) -> tuple[bytes, TorrentInfo]:
    """The .torrent bytes for one split's shards in `directory`, and its manifest record.

    Raises:
        VerifyError: a shard is missing or differs from the manifest.
    """
    shards = sorted(manifest.split(split).shards, key=lambda s: s.name)
    if not shards:
        raise ShardtoolError(f"{manifest.origin}: split {split!r} has no shards")
    name = default_torrent_name(manifest.dataset, split)
    piece_size = piece_size_for(sum(s.size for s in shards))
    entries = [lt.create_file_entry(f"{name}/{s.name}", s.size) for s in shards]
    ct = lt.create_torrent(entries, piece_size, lt.create_torrent.v1_only)
    for i, digest in enumerate(_hash_pieces(shards, directory, piece_size, f"torrent {split}")):
        ct.set_hash(i, digest)
    ct.set_creation_date(0)
    for url in web_seeds:
        ct.add_url_seed(base_url(url))
    for tier, url in enumerate(trackers):
        ct.add_tracker(url, tier)
    data = lt.bencode(ct.generate())
    ti = lt.torrent_info(data)
    infohash = str(ti.info_hashes().v1)
    return data, TorrentInfo(infohash, lt.make_magnet_uri(ti), f"{name}.torrent", name)


def write_torrents(
    manifest_path: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    web_seeds: Sequence[str] = (),
    trackers: Sequence[str] = (),
) -> dict[str, TorrentInfo]:
    """Create the torrent of each split, write the .torrent files beside the manifest, record them in it.

    The manifest is rewritten atomically and only after every .torrent is in place.
    """
    manifest = load(manifest_path)
    directory = manifest.base_dir
    if directory is None:
        raise ShardtoolError(f"{manifest_path}: torrents are made from a local shard folder, not a URL")
    made = {}
    for split in splits or list(manifest.splits):
        data, info = create_torrent(manifest, split, directory, web_seeds=web_seeds, trackers=trackers)
        atomic_write_bytes(directory / info.file, data)
        made[split] = info
        log.info("%s: %s (%s)", split, info.file, info.infohash)
    manifest.sources.torrents.update(made)
    manifest.save(manifest.origin)
    return made


# ---- loading ----------------------------------------------------------------------------------


def torrent_record(manifest: Manifest, split: str) -> TorrentInfo:
    try:
        return manifest.sources.torrents[split]
    except KeyError:
        raise FetchError(
            f"{manifest.origin}: no torrent for split {split!r} (create one with `shardtool torrent`)"
        ) from None


def read_torrent(
    manifest: Manifest, split: str, *, mirrors: Sequence[str] = (), timeout: float = 30.0
) -> bytes:
    """The split's .torrent: from beside a local manifest, else from the HTTP sources, checked against
    the manifest's info-hash and shard list (a torrent that differs is refused)."""
    import httpx

    info = torrent_record(manifest, split)
    failures = []
    candidates: list[str] = []
    if manifest.base_dir is not None:
        candidates.append(str(manifest.base_dir / info.file))
    candidates += [base_url(m) + info.file for m in (*mirrors, *manifest.sources.http)]
    for where in candidates:
        try:
            if is_url(where):
                resp = httpx.get(where, timeout=timeout, follow_redirects=True)
                if resp.status_code != 200:
                    raise OSError(f"HTTP {resp.status_code}")
                data = resp.content
            else:
                data = Path(where).read_bytes()
            check_torrent(data, manifest, split)
            return data
        except (OSError, httpx.HTTPError, FetchError) as e:
            failures.append(SourceFailure(where, str(e)))
    found = "; ".join(map(str, failures)) or "no source"
    raise FetchError(f"torrent of split {split!r}: not found ({found})", failures=failures)


def check_torrent(data: bytes, manifest: Manifest, split: str) -> lt.torrent_info:
    """Parse .torrent bytes and check they describe exactly this split's shards under its info-hash."""
    info = torrent_record(manifest, split)
    try:
        ti = lt.torrent_info(lt.bdecode(data))
    except (RuntimeError, TypeError, ValueError) as e:
        raise FetchError(f"{info.file}: not a valid torrent ({e})") from None
    if str(ti.info_hashes().v1) != info.infohash:
        raise FetchError(
            f"{info.file}: info-hash {ti.info_hashes().v1} is not the manifest's {info.infohash}"
        )
    layout = ti.layout()
    have = sorted((layout.file_name(i), layout.file_size(i)) for i in range(layout.num_files()))
    want = sorted((s.name, s.size) for s in manifest.split(split).shards)
    if have != want:
        raise FetchError(f"{info.file}: its files are not the shards of split {split!r}")
    return ti


def file_indices(ti: lt.torrent_info) -> dict[str, int]:
    """Shard name -> file index in the torrent."""
    layout = ti.layout()
    return {layout.file_name(i): i for i in range(layout.num_files())}
