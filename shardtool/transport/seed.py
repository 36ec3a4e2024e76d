"""Seeding a shard folder's torrents with libtorrent, after checking the shards that are there.

A peer may hold only some shards (it fetched its `K/N` slice): missing shards are listed and left out,
and the torrent is in upload mode so a seeder never downloads. Present shards are checked:

- first start: libtorrent hashes every piece. A present shard whose pieces do not all verify is not
  necessarily bad (a piece can span it and a missing neighbour), so it is then checked by sha256 against
  the manifest; one that fails is an error, never quietly left unseeded.
- fast resume: after a full check the resume data is saved in `.shardtool-seed/` with each shard's size
  and mtime. libtorrent trusts resume data without reading the files (a truncated file would still
  count as complete), so it is used only while every shard's size and mtime are unchanged.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt
from tqdm import tqdm

from ..errors import ShardtoolError, VerifyError
from ..fsutil import atomic_write_text
from ..manifest import Manifest, Shard
from ..verify import verify_shard
from .torrent import TorrentOptions, check_torrent, connect_peers, file_indices, listen_address, open_session

log = logging.getLogger(__name__)

RESUME_DIR = ".shardtool-seed"
_CHECKING = (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)


@dataclass(frozen=True)
class SeedStatus:
    """A snapshot for the status line."""

    peers: int
    upload_rate: float  # bytes per second
    uploaded: int  # bytes since start
    seeding: int  # bytes of shards being seeded

    @property
    def ratio(self) -> float:
        return self.uploaded / self.seeding if self.seeding else 0.0


@dataclass
class _Seeded:
    split: str
    handle: lt.torrent_handle
    ti: lt.torrent_info
    shards: list[Shard]  # present
    missing: list[str]
    stamps: dict[str, list[int]]
    resumed: bool


class Seeder:
    """Seeds the torrents of a shard folder's manifest.

    >>> with Seeder(manifest, Path("shards"), TorrentOptions(listen="0.0.0.0:6881")) as seeder:
    ...     print(seeder.magnets, seeder.address)
    """

    def __init__(
        self,
        manifest: Manifest,
        directory: str | os.PathLike,
        options: TorrentOptions,
        *,
        splits: Sequence[str] | None = None,
    ):
        self.manifest = manifest
        self.directory = Path(directory)
        self.options = options
        self.splits = (
            list(splits) if splits else [s for s in manifest.splits if s in manifest.sources.torrents]
        )
        if not self.splits:
            raise ShardtoolError(
                f"{manifest.origin}: no torrent to seed (create one with `shardtool torrent {manifest.origin}`)"
            )
        self.session: lt.session | None = None
        self.seeded: list[_Seeded] = []

    @property
    def magnets(self) -> dict[str, str]:
        return {s: self.manifest.sources.torrents[s].magnet for s in self.splits}

    @property
    def address(self) -> str:
        return listen_address(self.session, self.options)

    def start(self, *, timeout: float = 3600.0) -> None:
        """Open the session, add each split's torrent, and return once all are checked.

        Raises:
            VerifyError: a present shard differs from the manifest.
            ShardtoolError: a .torrent is missing or does not match the manifest; no shard to seed.
        """
        self.session = open_session(self.options, seeding=True)
        for split in self.splits:
            self.seeded.append(self._add(split))
        deadline = time.monotonic() + timeout
        total = sum(s.ti.total_size() for s in self.seeded)
        with tqdm(total=total, unit="B", unit_scale=True, desc="checking", leave=False, disable=None) as bar:
            while any(s.handle.status().state in _CHECKING for s in self.seeded):
                if time.monotonic() > deadline:
                    raise ShardtoolError(f"checking the shards in {self.directory} took over {timeout:.0f} s")
                self.session.wait_for_alert(200)
                self.poll()
                statuses = [(s.handle.status(), s.ti.total_size()) for s in self.seeded]
                bar.update(int(sum(st.progress * size for st, size in statuses)) - bar.n)
        for seeded in self.seeded:
            self._verify(seeded)
        if not any(s.shards for s in self.seeded):
            raise ShardtoolError(f"{self.directory}: none of the manifest's shards are here to seed")

    def _add(self, split: str) -> _Seeded:
        info = self.manifest.sources.torrents.get(split)
        if info is None:
            raise ShardtoolError(f"{self.manifest.origin}: no torrent for split {split!r}")
        path = self.directory / info.file
        try:
            ti = check_torrent(path.read_bytes(), self.manifest, split)
        except FileNotFoundError:
            raise ShardtoolError(f"{path}: missing (run `shardtool torrent` or fetch it again)") from None
        present, missing, stamps = [], [], {}
        for shard in self.manifest.split(split).shards:
            local = self.directory / shard.name
            try:
                st = local.stat()
            except FileNotFoundError:
                missing.append(shard.name)
                continue
            if problem := verify_shard(local, shard, sha256=False):
                raise VerifyError(f"{local}: {problem}")
            present.append(shard)
            stamps[shard.name] = [st.st_size, st.st_mtime_ns]
        index = file_indices(ti)
        atp, resumed = self._resume(info.infohash, stamps)
        atp.ti = ti
        atp.save_path = str(self.directory)
        atp.renamed_files = {i: name for name, i in index.items()}
        keep = {index[s.name] for s in present}
        atp.file_priorities = [4 if i in keep else 0 for i in range(len(index))]
        # resume data carries the trackers of its day and would override the .torrent's current ones
        atp.flags &= ~(
            lt.torrent_flags.auto_managed
            | lt.torrent_flags.paused
            | lt.torrent_flags.override_trackers
            | lt.torrent_flags.override_web_seeds
        )
        atp.flags |= lt.torrent_flags.upload_mode
        atp.trackers = list(self.options.trackers)
        handle = self.session.add_torrent(atp)
        connect_peers(handle, self.options.peers)
        if missing:
            log.info(
                "%s: %d of %d shards here; not seeding %s", split, len(present), len(index), _few(missing)
            )
        return _Seeded(split, handle, ti, present, missing, stamps, resumed)

    def _resume_path(self, infohash: str) -> Path:
        return self.directory / RESUME_DIR / f"{infohash}.json"

    def _resume(self, infohash: str, stamps: dict[str, list[int]]) -> tuple[lt.add_torrent_params, bool]:
        """Resume data saved after an earlier full check, if no shard changed since; else fresh params."""
        try:
            saved = json.loads(self._resume_path(infohash).read_text())
            if saved["stamps"] == stamps:
                log.info("%s: shards unchanged since the last check; using fast resume", infohash[:12])
                return lt.read_resume_data(base64.b64decode(saved["resume"])), True
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            pass
        return lt.add_torrent_params(), False

    def _verify(self, seeded: _Seeded) -> None:
        """After libtorrent's check: anything not fully verified by pieces is checked by sha256."""
        if seeded.resumed:
            return
        progress = seeded.handle.file_progress(lt.torrent_handle.piece_granularity)
        index = file_indices(seeded.ti)
        bad = []
        for shard in seeded.shards:
            if progress[index[shard.name]] != shard.size and verify_shard(self.directory / shard.name, shard):
                bad.append(shard.name)
        if bad:
            raise VerifyError(
                f"{self.directory}: {_few(bad)} differ from the manifest (re-fetch with `shardtool fetch --recheck`)"
            )
        seeded.handle.save_resume_data(lt.save_resume_flags_t.save_info_dict)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.session.wait_for_alert(200)
            for alert in self.session.pop_alerts():
                if isinstance(alert, lt.save_resume_data_alert) and alert.handle == seeded.handle:
                    data = {
                        "stamps": seeded.stamps,
                        "resume": base64.b64encode(lt.write_resume_data_buf(alert.params)).decode(),
                    }
                    path = self._resume_path(str(seeded.ti.info_hashes().v1))
                    path.parent.mkdir(exist_ok=True)
                    atomic_write_text(path, json.dumps(data))
                    return
                self._log(alert)

    def poll(self) -> None:
        """Log what the session reports (errors, peers coming and going); call now and then."""
        for alert in self.session.pop_alerts():
            self._log(alert)

    @staticmethod
    def _log(alert) -> None:
        if alert.category() & lt.alert_category.error:
            log.warning("%s", alert.message())
        else:
            log.debug("%s", alert.message())

    def status(self) -> SeedStatus:
        statuses = [s.handle.status() for s in self.seeded]
        return SeedStatus(
            peers=sum(st.num_peers for st in statuses),
            upload_rate=sum(st.upload_payload_rate for st in statuses),
            uploaded=sum(st.total_payload_upload for st in statuses),
            seeding=sum(sum(sh.size for sh in s.shards) for s in self.seeded),
        )

    def close(self) -> None:
        """Stop seeding and shut the session down."""
        if self.session is not None:
            for seeded in self.seeded:
                self.session.remove_torrent(seeded.handle)
            self.session = None  # the last reference: libtorrent shuts down here

    def __enter__(self) -> Seeder:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
