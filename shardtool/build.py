"""`shardtool build`: a dataset folder in, reproducible WebDataset shards and manifest.json out.

The pipeline, per split:

1. List every record (sources/), sorted by canonical source name: the filesystem's order never matters.
2. Shuffle the list with `random.Random(f"{seed}/{split}")`, so every shard mixes classes; `--limit`
   keeps a prefix of it.
3. Check and normalise images in worker processes (check.py, images.py), in that fixed order, while this
   process packs the results into shards by size (writer.ShardWriter). Because the order is fixed
   before any work starts, the shards are bit-identical whatever `--workers` is.
4. After each shard is renamed into place, it is recorded in the journal (journal.py). A rerun of the
   same command checks the finished shards (size and sha256) and continues from the first unfinished
   record; a different input or different options refuse to mix with it. manifest.json is written
   last, atomically.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import PIL
from tqdm import tqdm

from . import __version__, datasets
from .check import Checked, checking, reread
from .errors import BuildError
from .images import ImageOptions
from .journal import Entry, Journal, remove_stale_temps, remove_unfinished, shard_name
from .manifest import MANIFEST_NAME, Manifest, Shard, Split
from .sources import Listing, Record, Source, SourceOptions, open_source
from .writer import ShardWriter

log = logging.getLogger(__name__)

_MAX_LOGGED_SKIPS = 20
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # compact and canonical sample metadata


@dataclass(frozen=True)
class BuildOptions:
    """Everything that decides what a build writes (and the run settings that do not).

    Attributes:
        seed: shuffle seed; the split name is mixed in so train and val orders differ.
        shard_size: target shard size in bytes (a shard is closed before it would grow past it).
        max_per_shard: optional cap on samples per shard.
        image: resize and JPEG quality for re-encoded images.
        limit: keep only the first N shuffled records of each split (quick trials).
        splits: the splits to build (None: the layout's defaults; Tiny-ImageNet's test only on request).
        layout: force a layout instead of detecting it.
        source: where to find what a layout cannot discover (val labels).
        name: the dataset name for the manifest (default: the known dataset it matches, else the folder name).
        workers: check processes (0: check in this process); the default leaves a CPU to the packer.
        strict: a bad file stops the build instead of being skipped.
    """

    seed: int = 0
    shard_size: int = 256_000_000
    max_per_shard: int | None = None
    image: ImageOptions = field(default_factory=ImageOptions)
    limit: int | None = None
    splits: tuple[str, ...] | None = None
    layout: str | None = None
    source: SourceOptions = field(default_factory=SourceOptions)
    name: str | None = None
    workers: int = field(default_factory=lambda: max(1, min(8, (os.cpu_count() or 2) - 1)))
    strict: bool = False


@dataclass(frozen=True)
class SplitReport:
    """What happened to one split.

    Attributes:
        listed: records the layout listed (before `--limit`).
        samples, shards, bytes: what the split's shards hold, including those kept from before.
        skipped: files skipped while listing, and while checking in this run.
        converted: images re-encoded in this run.
        resumed_shards: finished shards an interrupted run left, checked and kept.
    """

    name: str
    listed: int
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    skipped: int = 0
    converted: int = 0
    resumed_shards: int = 0


@dataclass
class BuildReport:
    manifest: Manifest
    splits: list[SplitReport]
    seconds: float
    notes: list[str] = field(default_factory=list)


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '4096' -> 4096 (decimal units unless an 'i' says binary)."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise BuildError(f"cannot read size {text!r} (expected e.g. 256MB, 1GiB or a number of bytes)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = "_kmgt".index(unit) if unit else 0
    size = int(number * (1024 if binary else 1000) ** power)
    if size < 1:
        raise BuildError(f"size {text!r} is too small")
    return size


def build(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: BuildOptions,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Build shards and manifest.json for the dataset at `src` into `out`, resuming an interrupted build.

    Args:
        overwrite: delete an earlier build in `out` (its shards, manifest and journal) instead of refusing.
        progress: show a progress bar on stderr.

    Raises:
        LayoutError: `src` is not a known layout or lacks a file it needs.
        BuildError: bad labels, an empty split, a bad file with `strict`, or `out` holding another build.
    """
    started = time.monotonic()
    out = Path(out)
    source = open_source(src, options.layout, options.source)
    splits = options.splits or source.default_splits
    listings = {split: source.listing(split) for split in splits}
    if options.strict:
        for listing in listings.values():
            for entry in listing.skipped[:1]:
                raise BuildError(f"{entry['path']}: {entry['reason']} (--strict)")
    orders = {split: _order(listing.records, split, options) for split, listing in listings.items()}
    notes = _compare_with_definition(source, listings)
    build_info = _build_info(source.layout, options)
    with _write_errors(out):
        remove_stale_temps(out)
        journal = Journal.open(
            out, fingerprint=_fingerprint(build_info, orders), build_info=build_info, overwrite=overwrite
        )
        skipped: list[dict[str, str]] = []
        reports, result_splits = [], {}
        for split in splits:
            listing, labeled = listings[split], split not in source.unlabeled
            built = _build_split(
                orders[split],
                split=split,
                labeled=labeled,
                journal=journal,
                options=options,
                progress=progress,
            )
            skipped += listing.skipped + built.skipped
            result_splits[split] = Split(built.shards, labeled=labeled)
            reports.append(built.report(split, listing))

        definition = datasets.match(source.layout, len(source.classes))
        manifest = Manifest(
            dataset=options.name or (definition.name if definition else Path(src).resolve().name),
            layout=source.layout,
            classes=source.classes,
            splits=result_splits,
            build=build_info,
            skipped=sorted(skipped, key=lambda s: s["path"]),
        )
        manifest.save(out / MANIFEST_NAME)
    manifest.origin = str(out / MANIFEST_NAME)
    return BuildReport(manifest, reports, time.monotonic() - started, notes)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_WRITE_ERRORS = (*_FULL, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def _write_errors(out: Path):
    """A write into `out` that fails (a full disk, a file size limit, a read-only mount) is one line that
    says what to do; whatever finished is kept for the rerun."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        hint = "; free some space and run the same command again (finished shards are kept)"
        raise BuildError(f"{out}: cannot write ({e.strerror}){hint if e.errno in _FULL else ''}") from None


def _order(records: list[Record], split: str, options: BuildOptions) -> list[Record]:
    order = list(records)
    random.Random(f"{options.seed}/{split}").shuffle(order)
    return order[: options.limit] if options.limit is not None else order


def _build_info(layout: str, options: BuildOptions) -> dict:
    """The manifest's `build` dict: the options and versions that decide the shards' bytes."""
    return {
        "layout": layout,
        "seed": options.seed,
        "shard_size": options.shard_size,
        "max_per_shard": options.max_per_shard,
        "resize": options.image.resize,
        "quality": options.image.quality,
        "limit": options.limit,
        "shardtool": __version__,
        "pillow": PIL.__version__,
    }


def _fingerprint(build_info: dict, orders: dict[str, list[Record]]) -> str:
    """What a resumed build must share with the first run: options and the exact ordered record lists."""
    digest = hashlib.sha256(json.dumps(build_info, sort_keys=True).encode())
    for split, records in orders.items():
        digest.update(f"\0{split}\0".encode())
        for r in records:
            digest.update(f"{r.key}\t{r.source}\t{r.label}\n".encode())
    return digest.hexdigest()


def _compare_with_definition(source: Source, listings: dict[str, Listing]) -> list[str]:
    """Notes on images missing compared with the known dataset this looks like (none if it is no known one)."""
    definition = datasets.match(source.layout, len(source.classes))
    if definition is None:
        return []
    notes = [
        f"{definition.name} {split}: found {found:,} of {expected:,} images ({expected - found:,} missing)"
        for split, listing in listings.items()
        if (expected := definition.splits.get(split, 0)) > (found := len(listing.records))
    ]
    for note in notes:
        log.warning(note)
    return notes


# ---- one split --------------------------------------------------------------------------------------


class _BuiltSplit(NamedTuple):
    """The shards of one split (those kept from before first) and what this run did."""

    shards: list[Shard]
    skipped: list[dict[str, str]]  # files skipped in the shards' ranges, from before and from this run
    skipped_now: int
    converted: int
    resumed_shards: int

    def report(self, split: str, listing: Listing) -> SplitReport:
        return SplitReport(
            split,
            len(listing.records),
            samples=sum(s.num_samples for s in self.shards),
            shards=len(self.shards),
            bytes=sum(s.size for s in self.shards),
            skipped=len(listing.skipped) + self.skipped_now,
            converted=self.converted,
            resumed_shards=self.resumed_shards,
        )


def _build_split(
    records: list[Record],
    *,
    split: str,
    labeled: bool,
    journal: Journal,
    options: BuildOptions,
    progress: bool,
) -> _BuiltSplit:
    """Write the shards of one split from its shuffled records, resuming after those the journal lists."""
    out = journal.out
    done = journal.finished(split)
    start = done[-1].end if done else 0
    remove_unfinished(out, split, len(done))
    todo = records[start:]
    bar = tqdm(total=len(records), initial=start, desc=split, unit="img", disable=not progress or None)
    skipped_now = converted = bytes_in = 0
    last_post, t0 = 0.0, time.monotonic()
    with checking(todo, workers=options.workers, image=options.image) as checks:
        packer = _Packer(journal, split=split, options=options, start=start, number=len(done))
        try:
            for i, (record, checked) in enumerate(zip(todo, checks), start):
                if checked.kept_as_is:
                    checked = reread(record, checked, options.image)
                bar.update(1)
                if checked.skip is not None:
                    if options.strict:
                        raise BuildError(f"{record.location}: {checked.skip} (--strict)")
                    if skipped_now < _MAX_LOGGED_SKIPS:
                        log.warning("skipped %s: %s", record.location, checked.skip)
                    packer.skip({"path": record.location, "reason": checked.skip})
                    skipped_now += 1
                    continue
                converted += checked.converted is not None
                packer.add(i, record.key, _sample(record, checked, labeled=labeled))
                bytes_in += len(checked.data)
                now = time.monotonic()
                if progress and now - last_post > 0.5:
                    bar.set_postfix_str(f"{bytes_in / 1e6 / max(now - t0, 1e-9):.1f} MB/s", refresh=False)
                    last_post = now
            entries = done + packer.finish(len(records))
        finally:
            packer.abort()
            bar.close()
            remove_unfinished(out, split, packer.number)  # a shard the interruption caught half-made
    if not entries:
        raise BuildError(f"split {split!r}: all {len(records)} images were skipped (see the messages above)")
    return _BuiltSplit(
        shards=[e.shard for e in entries],
        skipped=[s for e in entries for s in e.skipped],
        skipped_now=skipped_now,
        converted=converted,
        resumed_shards=len(done),
    )


def _sample(record: Record, checked: Checked, *, labeled: bool) -> dict[str, bytes]:
    """The fields of a sample: the image, its class index (labeled splits) and its metadata."""
    meta = {"source": record.source, "width": checked.width, "height": checked.height}
    fields = {checked.ext: checked.data}
    if labeled:
        fields["cls"] = b"%d" % record.label
        meta["wnid"] = record.wnid
    fields["json"] = _JSON.encode(meta).encode()
    return fields


MAX_CLOSING = 2
"""Shard closes (flush, fsync, rename) pending at once: one overlaps the packing of the next shard."""


class _Packer:
    """Packs samples, in order, into shards of at most `shard_size` bytes (or `max_per_shard` samples).

    A full shard is closed on a background thread (final flush, fsync, rename, journal line) so that its
    disk sync overlaps the filling of the next one; the journal still gets the shards in order.

    Args:
        journal: where finished shards are recorded; the shards go into its folder.
        start: the index (in the split's order) of the first record to pack.
        number: the number of the first shard to write.
    """

    def __init__(
        self, journal: Journal, *, split: str, options: BuildOptions, start: int = 0, number: int = 0
    ):
        self.journal, self.split, self.options = journal, split, options
        self.start, self.number = start, number
        self.writer: ShardWriter | None = None
        self.bytes = 0
        self.skipped: list[dict[str, str]] = []
        self._closer = ThreadPoolExecutor(1, thread_name_prefix="shard-close")
        self._closing: list[Future[Entry]] = []
        self._settled = 0  # closes before this index have finished and been checked

    def add(self, index: int, key: str, fields: dict[str, bytes]) -> None:
        size = _tar_size(fields)
        if self.writer is not None and (
            self.bytes + size > self.options.shard_size
            or (self.options.max_per_shard and self.writer.num_samples >= self.options.max_per_shard)
        ):
            self._close(index)
        if self.writer is None:
            self.writer = ShardWriter(self.journal.out / shard_name(self.split, self.number))
            self.number += 1
        self.writer.write(key, fields)
        self.bytes += size

    def skip(self, entry: dict[str, str]) -> None:
        """Record a skipped file; it is journalled with the shard that holds the records around it."""
        self.skipped.append(entry)

    def _close(self, end: int) -> None:
        # Closes finish in order. Take the results of those done (a failed close raises here, not at the
        # end), and wait while MAX_CLOSING are pending: packing small shards outruns their fsyncs, and
        # an unbounded queue made Ctrl-C wait for every queued sync (tens of seconds on a busy disk).
        while self._settled < len(self._closing):
            future = self._closing[self._settled]
            if not future.done() and len(self._closing) - self._settled < MAX_CLOSING:
                break
            future.result()
            self._settled += 1
        self._closing.append(
            self._closer.submit(self._finish_shard, self.writer, self.start, end, self.skipped)
        )
        self.writer, self.start, self.bytes, self.skipped = None, end, 0, []

    def _finish_shard(
        self, writer: ShardWriter, start: int, end: int, skipped: list[dict[str, str]]
    ) -> Entry:
        """Background: close the shard (renaming it into place), then journal it."""
        entry = Entry(self.split, writer.close(), start, end, skipped)
        self.journal.append(entry)
        return entry

    def finish(self, end: int) -> list[Entry]:
        """Close the last shard and wait for every close; the journal entries of the shards written."""
        if self.writer is not None:
            self._close(end)
        elif self.skipped and self._closing:  # cannot happen: a shard only closes when a sample follows
            raise BuildError(f"split {self.split!r}: skipped files after the last shard were not recorded")
        return [future.result() for future in self._closing]

    def abort(self) -> None:
        """Drop an unfinished shard; let closes already started complete (each is a finished shard)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self._closer.shutdown(wait=True)


def _tar_size(fields: dict[str, bytes]) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per member plus data padded to 512."""
    return sum(512 + (len(v) + 511) // 512 * 512 for v in fields.values())
