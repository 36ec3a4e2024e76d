"""`shardtool build`: a dataset folder in, reproducible WebDataset shards and manifest.json out.

The pipeline, per split:

1. List every record (sources/), sorted by canonical source name: the filesystem's order never matters.
2. Shuffle the list with `random.Random(f"{seed}/{split}")`, so every shard mixes classes; `--limit`
   keeps a prefix of it.
3. Check and normalise images in worker processes (images.py), in that fixed order (`imap`), while this
   process packs the results into shards by size (writer.ShardWriter). Workers return only what
   changed: an image kept byte-for-byte is read again here from the page cache, which costs less than
   sending it through a pipe (and checked again if the file changed in between). Because the order is
   fixed before any work starts, the shards are bit-identical whatever `--workers` is.
4. After each shard is renamed into place, a line goes into the journal `OUT/.shardtool-build/journal.jsonl`
   (shard entry, record range, skipped files). A rerun of the same command checks the finished shards
   (size and sha256) and continues from the first unfinished record; a different input or different
   options refuse to mix with it. manifest.json is written last, atomically.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL
from tqdm import tqdm

from . import __version__, datasets
from .errors import BuildError
from .fsutil import atomic_write_text, fsync_dir
from .images import BadImage, ImageOptions, encode_pixels, normalise
from .manifest import MANIFEST_NAME, Manifest, Shard, Split
from .sources import PixelData, Record, SourceOptions, Stamp, open_source
from .verify import verify_shard
from .writer import ShardWriter

log = logging.getLogger(__name__)

JOURNAL_DIR = ".shardtool-build"
JOURNAL = "journal.jsonl"
_SHARD_FILE = re.compile(r"([a-z][a-z0-9_]*)-(\d{6})\.tar")
_TEMP_FILE = re.compile(r"\.[a-z][a-z0-9_]*-\d{6}\.tar\..*\.tmp")
_MAX_LOGGED_SKIPS = 20
_BATCH = 64  # records per worker task
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


@dataclass
class SplitReport:
    """What happened to one split."""

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
    fingerprint = _fingerprint(build_info, orders)
    with _write_errors(out):
        _remove_stale_temps(out)
        journal = _Journal.open(out, fingerprint, build_info, overwrite=overwrite)

        skipped: list[dict[str, str]] = []
        reports, result_splits = [], {}
        for split in splits:
            skipped += listings[split].skipped
            report = SplitReport(split, len(listings[split].records))
            shards, split_skipped = _build_split(
                split, orders[split], out, options, source.unlabeled, journal, report, progress
            )
            skipped += split_skipped
            report.skipped += len(listings[split].skipped)
            result_splits[split] = Split(shards, labeled=split not in source.unlabeled)
            reports.append(report)

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


def _compare_with_definition(source, listings) -> list[str]:
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


def _check(record: Record, options: ImageOptions) -> tuple:
    """Worker side: (ext, new bytes or None, source stamp, width, height, converted, skip reason).

    The stamp (see `Stamp`) is taken before the read: the packer matches it against one taken after its
    own read of a file kept as it is, so bytes that changed after this check are never stored unchecked.
    """
    if isinstance(record.data, PixelData):
        d = record.data
        return "png", encode_pixels(d.pixels, d.width, d.height), (), d.width, d.height, None, None
    try:
        data, stamp = record.data.read_stamped(stamp_first=True)
    except OSError as e:
        return None, None, (), 0, 0, None, f"cannot read ({e.strerror or e})"
    return _judge(record, data, stamp, options)


def _judge(record: Record, data: bytes, stamp: Stamp, options: ImageOptions) -> tuple:
    try:
        n = normalise(data, record.declared, options)
    except BadImage as e:
        return None, None, stamp, 0, 0, None, str(e)
    return n.ext, n.data, stamp, n.width, n.height, n.converted, None


def _reread(record: Record, result: tuple, options: ImageOptions) -> tuple[bytes | None, tuple]:
    """Packer side, for a file a worker kept as it is: its bytes read again (from the page cache, which
    costs less than sending them through a pipe), and the result to use.

    A file that vanished or changed since the worker checked it is checked again here, as it is now:
    skipped with a reason, or stored with the bytes just read, never with bytes nobody checked.
    """
    try:
        data, stamp = record.data.read_stamped(stamp_first=False)
    except OSError as e:
        reason = f"cannot read ({e.strerror or e}) since it was checked: changed during the build"
        return None, (None, None, (), 0, 0, None, reason)
    if stamp == result[2]:
        return data, result
    log.warning("%s changed since a worker checked it: checking it again", record.location)
    result = _judge(record, data, stamp, options)
    return (result[1] if result[1] is not None else data), result


# Set once in each worker process by `_worker_init` (the parent never sets it): the records to check, which
# a forked worker inherits, so tasks are bare indices and no record is pickled.
_worker_records: tuple[list[Record], ImageOptions] | None = None


def _worker_init(records: list[Record], options: ImageOptions) -> None:
    global _worker_records
    _worker_records = records, options
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _check_range(span: tuple[int, int]) -> list[tuple]:
    """Check records[start:end]: one task and one result message per batch, not per image."""
    records, options = _worker_records
    return [_check(records[i], options) for i in range(*span)]


def _build_split(split, records, out, options, unlabeled, journal, report, progress):
    """Write the shards of one split, resuming after the ones the journal lists; (shards, skipped)."""
    done = journal.verified_shards(split, out)
    start = done[-1]["end"] if done else 0
    report.resumed_shards = len(done)
    _remove_stale(out, split, len(done))
    labeled = split not in unlabeled
    todo = records[start:]
    bar = tqdm(total=len(records), initial=start, desc=split, unit="img", disable=not progress or None)
    pool = None
    if options.workers > 0 and todo:
        gc.freeze()  # forked workers share the record list: keep their garbage collector off its pages
        pool = multiprocessing.get_context("fork").Pool(
            options.workers, initializer=_worker_init, initargs=(todo, options.image)
        )
        gc.unfreeze()
        spans = ((i, min(i + _BATCH, len(todo))) for i in range(0, len(todo), _BATCH))
        results = itertools.chain.from_iterable(pool.imap(_check_range, spans))
    else:
        results = map(functools.partial(_check, options=options.image), todo)
    packer = _Packer(split, out, options, journal, start, len(done))
    bytes_in, last_post, t0 = 0, 0.0, time.monotonic()
    try:
        for i, (record, result) in enumerate(zip(todo, results), start):
            data = result[1]
            if data is None and result[6] is None:  # kept as it is: read it again here
                data, result = _reread(record, result, options.image)
            ext, _, _, width, height, converted, reason = result
            bar.update(1)
            if reason is not None:
                if options.strict:
                    raise BuildError(f"{record.location}: {reason} (--strict)")
                if report.skipped < _MAX_LOGGED_SKIPS:
                    log.warning("skipped %s: %s", record.location, reason)
                packer.skipped.append({"path": record.location, "reason": reason})
                report.skipped += 1
                continue
            report.converted += converted is not None
            meta = {"source": record.source, "width": width, "height": height}
            fields = {ext: data}
            if labeled:
                fields["cls"] = b"%d" % record.label
                meta["wnid"] = record.wnid
            fields["json"] = _JSON.encode(meta).encode()
            packer.add(i, record.key, fields)
            bytes_in += len(data)
            now = time.monotonic()
            if progress and now - last_post > 0.5:
                bar.set_postfix_str(f"{bytes_in / 1e6 / max(now - t0, 1e-9):.1f} MB/s", refresh=False)
                last_post = now
        finished = packer.finish(len(records))
    finally:
        packer.abort()
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
        _remove_stale(out, split, packer.number)  # temp files of a shard the interruption caught half-made
    shards = [Shard(**e["shard"]) for e in done] + [shard for shard, _ in finished]
    skipped = [s for e in done for s in e["skipped"]] + [s for _, skips in finished for s in skips]
    if not shards:
        raise BuildError(f"split {split!r}: all {len(records)} images were skipped (see the messages above)")
    report.samples = sum(s.num_samples for s in shards)
    report.shards = len(shards)
    report.bytes = sum(s.size for s in shards)
    return shards, skipped


MAX_CLOSING = 2
"""Shard closes (flush, fsync, rename) pending at once: one overlaps the packing of the next shard."""


class _Packer:
    """Packs samples, in order, into shards of at most `shard_size` bytes (or `max_per_shard` samples).

    A full shard is closed on a background thread (final flush, fsync, rename, journal line) so that its
    disk sync overlaps the filling of the next one; the journal still gets the shards in order.
    """

    def __init__(
        self, split: str, out: Path, options: BuildOptions, journal: _Journal, start: int, number: int
    ):
        self.split, self.out, self.options, self.journal = split, out, options, journal
        self.start, self.number = start, number
        self.writer: ShardWriter | None = None
        self.bytes = 0
        self.skipped: list[dict[str, str]] = []
        self._closer = ThreadPoolExecutor(1, thread_name_prefix="shard-close")
        self._closing: list[tuple[Future, list[dict[str, str]]]] = []
        self._settled = 0  # closes before this index have finished and been checked

    def add(self, index: int, key: str, fields: dict[str, bytes]) -> None:
        size = _tar_size(fields)
        if self.writer is not None and (
            self.bytes + size > self.options.shard_size
            or (self.options.max_per_shard and self.writer.num_samples >= self.options.max_per_shard)
        ):
            self._close(index)
        if self.writer is None:
            self.writer = ShardWriter(self.out / f"{self.split}-{self.number:06d}.tar")
            self.number += 1
        self.writer.write(key, fields)
        self.bytes += size

    def _close(self, end: int) -> None:
        # Closes finish in order. Take the results of those done (a failed close raises here, not at the
        # end), and wait while MAX_CLOSING are pending: packing small shards outruns their fsyncs, and
        # an unbounded queue made Ctrl-C wait for every queued sync (tens of seconds on a busy disk).
        while self._settled < len(self._closing):
            future = self._closing[self._settled][0]
            if not future.done() and len(self._closing) - self._settled < MAX_CLOSING:
                break
            future.result()
            self._settled += 1
        job = self._closer.submit(self.journal.finish, self.split, self.writer, self.start, end, self.skipped)
        self._closing.append((job, self.skipped))
        self.writer, self.start, self.bytes, self.skipped = None, end, 0, []

    def finish(self, end: int) -> list[tuple[Shard, list[dict[str, str]]]]:
        """Close the last shard and wait for every close; [(shard, files skipped in its range)]."""
        if self.writer is not None:
            self._close(end)
        elif self.skipped and self._closing:  # cannot happen: a shard only closes when a sample follows
            raise BuildError(f"split {self.split!r}: skipped files after the last shard were not recorded")
        return [(future.result(), skips) for future, skips in self._closing]

    def abort(self) -> None:
        """Drop an unfinished shard; let closes already started complete (each is a finished shard)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self._closer.shutdown(wait=True)


def _tar_size(fields: dict[str, bytes]) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per member plus data padded to 512."""
    return sum(512 + (len(v) + 511) // 512 * 512 for v in fields.values())


def _remove_stale(out: Path, split: str, first_unfinished: int) -> None:
    """Delete temp files of `split`, and its shards numbered from `first_unfinished` on (an interrupted run's)."""
    for path in out.iterdir():
        m = _SHARD_FILE.fullmatch(path.name)
        if (m and m.group(1) == split and int(m.group(2)) >= first_unfinished) or (
            _TEMP_FILE.fullmatch(path.name) and path.name.startswith(f".{split}-")
        ):
            log.debug("removing %s left by an interrupted build", path)
            path.unlink()


def _remove_stale_temps(out: Path) -> None:
    """Delete the temp files of a manifest or journal write that a kill interrupted."""
    for pattern in (f".{MANIFEST_NAME}.*.tmp", f"{JOURNAL_DIR}/.{JOURNAL}.*.tmp"):
        for path in out.glob(pattern):
            log.debug("removing %s left by an interrupted build", path)
            path.unlink()


# ---- the journal ------------------------------------------------------------------------------------


class _Journal:
    """Finished shards of a build in progress, one JSON line each, after a header line with the fingerprint.

    A line is appended (and fsynced) only after its shard has been renamed into place, so every line names a
    complete shard; a line cut short by a kill is ignored.
    """

    def __init__(self, path: Path, entries: list[dict]):
        self.path = path
        self.entries = entries

    @classmethod
    def open(cls, out: Path, fingerprint: str, build_info: dict, *, overwrite: bool) -> _Journal:
        folder = out / JOURNAL_DIR
        path = folder / JOURNAL
        if overwrite:
            _clear(out)
        header, entries = cls._read(path)
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
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "build": build_info}) + "\n")
        return cls(path, entries)

    @staticmethod
    def _read(path: Path) -> tuple[dict | None, list[dict]]:
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

    def verified_shards(self, split: str, out: Path) -> list[dict]:
        """The journal's shards of `split` that still check out, in order; stops at the first that does not."""
        good = []
        for entry in (e for e in self.entries if e["split"] == split):
            shard = Shard(**entry["shard"])
            expected_start = good[-1]["end"] if good else 0
            problem = (
                "out of order"
                if entry["start"] != expected_start or shard.name != (f"{split}-{len(good):06d}.tar")
                else verify_shard(out / shard.name, shard)
            )
            if problem:
                log.warning("%s: %s; writing it again", out / shard.name, problem)
                break
            good.append(entry)
        if good:
            log.info("resuming %s: %d finished shards check out", split, len(good))
        if len(good) < sum(e["split"] == split for e in self.entries):
            self._rewrite([e for e in self.entries if e["split"] != split] + good)
        return good

    def finish(self, split: str, writer: ShardWriter, start: int, end: int, skipped: list[dict]) -> Shard:
        """Close `writer` (renaming the shard into place), then record it."""
        shard = writer.close()
        entry = {"split": split, "shard": asdict(shard), "start": start, "end": end, "skipped": skipped}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)
        return shard

    def _rewrite(self, entries: list[dict]) -> None:
        header = self.path.read_text(encoding="utf-8").split("\n", 1)[0]
        atomic_write_text(self.path, "\n".join([header, *(json.dumps(e) for e in entries)]) + "\n")
        self.entries = entries


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
