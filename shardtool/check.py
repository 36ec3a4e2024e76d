"""Checking a split's records in worker processes, in a fixed order, and what each check found.

Workers (forked, so they inherit the record list and tasks are bare index ranges) check and normalise
each image (images.py) and send back only what changed: an image kept byte-for-byte is read again by the
packer from the page cache, which costs less than sending it through a pipe. Stamps taken around both
reads make sure that bytes which changed after their check are checked again, never stored unchecked.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import multiprocessing
import signal
from collections.abc import Iterator
from typing import NamedTuple

from .images import BadImage, ImageOptions, encode_pixels, normalise
from .sources import PixelData, Record, Stamp

log = logging.getLogger(__name__)

_BATCH = 64  # records per worker task


class Checked(NamedTuple):
    """What the check of one record found; workers send it back, so it carries bytes only where they changed.

    Attributes:
        ext: the sample field to store the image under ("jpg", "png"), or None when it is skipped.
        data: the bytes to store; None when the file is stored as it is (the packer reads it again,
            see `reread`) or skipped.
        stamp: the source's stamp taken before the check read it (see `sources.Stamp`).
        width, height: the size of the stored image.
        converted: why it was re-encoded, or None.
        skip: why the record is skipped, or None.
    """

    ext: str | None = None
    data: bytes | None = None
    stamp: Stamp = ()
    width: int = 0
    height: int = 0
    converted: str | None = None
    skip: str | None = None

    @property
    def kept_as_is(self) -> bool:
        return self.data is None and self.skip is None


def _check(record: Record, options: ImageOptions) -> Checked:
    """Worker side: check one record.

    The stamp is taken before the read: the packer matches it against one taken after its own read of a
    file kept as it is, so bytes that changed after this check are never stored unchecked.
    """
    if isinstance(record.data, PixelData):
        d = record.data
        return Checked("png", encode_pixels(d.pixels, d.width, d.height), width=d.width, height=d.height)
    try:
        data, stamp = record.data.read_stamped(stamp_first=True)
    except OSError as e:
        return Checked(skip=f"cannot read ({e.strerror or e})")
    return _judge(record, data, stamp, options)


def _judge(record: Record, data: bytes, stamp: Stamp, options: ImageOptions) -> Checked:
    try:
        n = normalise(data, record.declared, options)
    except BadImage as e:
        return Checked(stamp=stamp, skip=str(e))
    return Checked(n.ext, n.data, stamp, n.width, n.height, n.converted)


def reread(record: Record, checked: Checked, options: ImageOptions) -> Checked:
    """Packer side, for a file a worker kept as it is: the check with the file's bytes read again (from
    the page cache, which costs less than sending them through a pipe).

    A file that vanished or changed since the worker checked it is checked again here, as it is now:
    skipped with a reason, or stored with the bytes just read, never with bytes nobody checked.
    """
    try:
        data, stamp = record.data.read_stamped(stamp_first=False)
    except OSError as e:
        return Checked(skip=f"cannot read ({e.strerror or e}) since it was checked: changed during the build")
    if stamp != checked.stamp:
        log.warning("%s changed since a worker checked it: checking it again", record.location)
        checked = _judge(record, data, stamp, options)
    return checked._replace(data=data) if checked.kept_as_is else checked


# Set once in each worker process by `_worker_init` (the parent never sets it): the records to check, which
# a forked worker inherits, so tasks are bare indices and no record is pickled.
_worker_records: tuple[list[Record], ImageOptions] | None = None


def _worker_init(records: list[Record], options: ImageOptions) -> None:
    global _worker_records
    _worker_records = records, options
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _check_range(span: tuple[int, int]) -> list[Checked]:
    """Check records[start:end]: one task and one result message per batch, not per image."""
    records, options = _worker_records
    return [_check(records[i], options) for i in range(*span)]


@contextlib.contextmanager
def checking(records: list[Record], *, workers: int, image: ImageOptions) -> Iterator[Iterator[Checked]]:
    """The checks of `records`, in order: from `workers` forked processes, or made here with 0."""
    if workers == 0 or not records:
        yield map(functools.partial(_check, options=image), records)
        return
    gc.freeze()  # forked workers share the record list: keep their garbage collector off its pages
    pool = multiprocessing.get_context("fork").Pool(
        workers, initializer=_worker_init, initargs=(records, image)
    )
    gc.unfreeze()
    try:
        spans = ((i, min(i + _BATCH, len(records))) for i in range(0, len(records), _BATCH))
        yield itertools.chain.from_iterable(pool.imap(_check_range, spans))
    finally:
        pool.terminate()
        pool.join()
