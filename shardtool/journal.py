"""What a build in progress has finished, so that running the same command again resumes it.

Building ImageNet takes hours; a Ctrl-C, a kill -9, a full disk or a power cut must not cost the shards
already written. `OUT/.shardtool-build/journal.jsonl` holds a header line (the build's fingerprint and
options), then one line per finished shard (its manifest entry, the range of records it holds and the
files skipped in that range). A line is appended and fsynced only after its shard has been renamed into
place, so every line names a complete shard; a line cut short by a kill is ignored. A rerun checks the
journalled shards (size and sha256) and continues from the first that does not check out; a build of
other input or options refuses to mix with it.

This module also knows the names of what a build writes into OUT (shards, their temp files, the
manifest, the journal), to tidy what an interruption left and to clear a build for `--overwrite`.

Written by hand: it is an append-only JSON-lines file, which needs no library.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import BuildError
from .fsutil import atomic_write_text, fsync_dir
from .manifest import MANIFEST_NAME, Shard
from .verify import verify_shard

log = logging.getLogger(__name__)

JOURNAL_DIR = ".shardtool-build"
JOURNAL = "journal.jsonl"
_SHARD_FILE = re.compile(r"([a-z][a-z0-9_]*)-(\d{6})\.tar")
_TEMP_FILE = re.compile(r"\.[a-z][a-z0-9_]*-\d{6}\.tar\..*\.tmp")


def shard_name(split: str, number: int) -> str:
    """The file name of a split's shard number `number` (from 0)."""
    return f"{split}-{number:06d}.tar"


@dataclass(frozen=True)
class Entry:
    """One finished shard: its manifest entry, the records it holds (`start` to `end` in the split's
    shuffled order) and the files skipped in that range (path and reason, as the manifest lists them)."""

    split: str
    shard: Shard
    start: int
    end: int
    skipped: list[dict[str, str]]

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "shard": asdict(self.shard),
            "start": self.start,
            "end": self.end,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, line: dict) -> Entry:
        return cls(line["split"], Shard(**line["shard"]), line["start"], line["end"], line["skipped"])


class Journal:
    """The journal of the build into `out` (see the module docstring); open it with `Journal.open`."""

    def __init__(self, out: Path, entries: list[Entry]):
        self.out = out
        self.path = out / JOURNAL_DIR / JOURNAL
        self.entries = entries

    @classmethod
    def open(cls, out: Path, *, fingerprint: str, build_info: dict, overwrite: bool) -> Journal:
        """The journal of a build into `out` with this fingerprint: the existing one, or a new one.

        Args:
            fingerprint: what identifies the build (options and the exact ordered records).
            build_info: the options, written into the header for people reading it.
            overwrite: first delete whatever an earlier build wrote into `out`.

        Raises:
            BuildError: `out` holds a build of another fingerprint, or shards or a manifest that no
                journal accounts for.
        """
        if overwrite:
            _clear(out)
        path = out / JOURNAL_DIR / JOURNAL
        header, lines = _read(path)
        if header is not None and header.get("fingerprint") != fingerprint:
            raise BuildError(
                f"{out}: holds a build of different input or options "
                "(use a new --out, or --overwrite to replace it)"
            )
        if header is None:
            if out.is_dir() and any(
                p.name == MANIFEST_NAME or _SHARD_FILE.fullmatch(p.name) for p in out.iterdir()
            ):
                raise BuildError(
                    f"{out}: already holds shards or a manifest that this build did not write "
                    "(use a new --out, or --overwrite to replace them)"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "build": build_info}) + "\n")
        return cls(out, [Entry.from_json(line) for line in lines])

    def finished(self, split: str) -> list[Entry]:
        """The journal's shards of `split` that still check out, in order; stops at the first that does not
        (and forgets it and those after it)."""
        good: list[Entry] = []
        for entry in (e for e in self.entries if e.split == split):
            expected_start = good[-1].end if good else 0
            problem = (
                "out of order"
                if entry.start != expected_start or entry.shard.name != shard_name(split, len(good))
                else verify_shard(self.out / entry.shard.name, entry.shard)
            )
            if problem:
                log.warning("%s: %s; writing it again", self.out / entry.shard.name, problem)
                break
            good.append(entry)
        if good:
            log.info("resuming %s: %d finished shards check out", split, len(good))
        if len(good) < sum(e.split == split for e in self.entries):
            self._rewrite([e for e in self.entries if e.split != split] + good)
        return good

    def append(self, entry: Entry) -> None:
        """Record a shard that has been renamed into place (durably: the line is fsynced)."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def _rewrite(self, entries: list[Entry]) -> None:
        header = self.path.read_text(encoding="utf-8").split("\n", 1)[0]
        lines = [header, *(json.dumps(e.to_json()) for e in entries)]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        self.entries = entries


def _read(path: Path) -> tuple[dict | None, list[dict]]:
    """The header and the entry lines of a journal; (None, []) where there is none."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        return None, []
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            break  # an empty last line, or one cut short by a kill
    if not parsed:
        return None, []
    return parsed[0], parsed[1:]


def remove_unfinished(out: Path, split: str, first_unfinished: int) -> None:
    """Delete temp files of `split`, and its shards numbered from `first_unfinished` on (an interrupted run's)."""
    for path in out.iterdir():
        m = _SHARD_FILE.fullmatch(path.name)
        if (m and m.group(1) == split and int(m.group(2)) >= first_unfinished) or (
            _TEMP_FILE.fullmatch(path.name) and path.name.startswith(f".{split}-")
        ):
            log.debug("removing %s left by an interrupted build", path)
            path.unlink()


def remove_stale_temps(out: Path) -> None:
    """Delete the temp files of a manifest or journal write that a kill interrupted."""
    for pattern in (f".{MANIFEST_NAME}.*.tmp", f"{JOURNAL_DIR}/.{JOURNAL}.*.tmp"):
        for path in out.glob(pattern):
            log.debug("removing %s left by an interrupted build", path)
            path.unlink()


def _clear(out: Path) -> None:
    """Remove what a build writes into `out` (shards, temp files, manifest, journal), and nothing else."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.name == MANIFEST_NAME or _SHARD_FILE.fullmatch(path.name) or _TEMP_FILE.fullmatch(path.name):
            path.unlink()
    journal = out / JOURNAL_DIR
    if journal.is_dir():
        for path in journal.iterdir():
            path.unlink()
        journal.rmdir()
    with contextlib.suppress(OSError):
        fsync_dir(out)
