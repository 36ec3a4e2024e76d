"""What runs in each DataLoader worker: webdataset stages from shard jobs to batches plus reports.

Per worker: jobs (from the queue, or a fixed slice of the list for validation) -> read_shards
(`wds.tarfile_samples` one shard at a time, counting) -> `wds.shuffle` -> `wds.map(Decode)` with a
handler that counts corrupt samples per shard -> `wds.batched`. Each item leaving the worker carries the
shard reports and corrupt counts since the previous one, so the main process can account for every
sample of every shard.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import queue
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..transforms import DECODE_ERRORS, IMAGE_FIELDS, decode_image
from .types import LoaderOptions

log = logging.getLogger(__name__)

_LOGGED_SKIPS_PER_SHARD = 3
_READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class Job:
    """What crosses to a worker for one shard (the tag stays behind)."""

    ticket: int
    path: str
    name: str


@dataclass(frozen=True)
class Report:
    ticket: int
    read: int
    error: str | None


@dataclass
class Item:
    """What a worker yields: a batch (possibly empty) plus the events since its previous item."""

    images: torch.Tensor | None
    raw: list[bytes] | None
    labels: torch.Tensor
    keys: list[str]
    shards: list[str]
    tickets: list[int]
    reports: list[Report] = field(default_factory=list)
    corrupt: dict[int, int] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Item:
        return cls(None, None, torch.empty(0, dtype=torch.int64), [], [], [])

    def pin_memory(self) -> Item:
        """Called by the DataLoader's pinning thread."""
        images = self.images.pin_memory() if self.images is not None else None
        return dataclasses.replace(self, images=images, labels=self.labels.pin_memory())


class _SampleError(Exception):
    """A sample that cannot be used; carries its shard ticket so the skip is counted against it."""

    def __init__(self, ticket: int, shard: str, key: str, reason: BaseException):
        super().__init__(f"{shard}: sample {key}: {type(reason).__name__}: {reason}")
        self.ticket = ticket


class _Events:
    """One worker's record of shard reports and corrupt samples not yet sent with an item."""

    def __init__(self) -> None:
        self.reports: list[Report] = []
        self.corrupt: Counter[int] = Counter()

    def skip(self, exn: Exception) -> bool:
        """webdataset handler: count and continue on bad samples, re-raise anything else."""
        if not isinstance(exn, _SampleError):
            raise exn
        self.corrupt[exn.ticket] += 1
        if self.corrupt[exn.ticket] <= _LOGGED_SKIPS_PER_SHARD:
            log.warning("skipping corrupt sample: %s", exn)
        return True

    @property
    def pending(self) -> bool:
        return bool(self.reports or self.corrupt)

    def attach(self, item: Item) -> Item:
        item.reports, item.corrupt = self.reports, dict(self.corrupt)
        self.reports, self.corrupt = [], Counter()
        return item


def _read_shards(jobs: Iterable[Job], events: _Events) -> Iterator[dict]:
    """Samples of each shard in turn, tagged with the shard; a report per shard once it is read.

    Runs webdataset's tar expansion and grouping (the two halves of `wds.tarfile_to_samples`) on one
    shard at a time rather than as one stage over all of them, because only then is the per-shard count
    exact: across shards, webdataset drops its end-of-shard marker when a tar fails, and a tar cut at a
    header ends without any error at all. Opening the file here closes it when the shard ends.
    """
    for job in jobs:
        errors: list[Exception] = []

        def keep_going(exn: Exception, errors: list[Exception] = errors) -> bool:
            errors.append(exn)
            return True

        read = 0
        try:
            for sample in _tar_samples(job.path, keep_going):
                sample["__ticket__"], sample["__shard__"] = job.ticket, job.name
                read += 1
                yield sample
        except OSError as e:  # opening failed; read errors go to the handler
            errors.append(e)
        error = _describe(errors[0]) if errors else None
        if error:
            log.warning("%s: read error after %d samples: %s", job.path, read, error)
        events.reports.append(Report(job.ticket, read, error))


read_shards = wds.pipelinefilter(_read_shards)


def _tar_samples(path: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    with open(path, "rb", buffering=_READ_BUFFER) as stream:
        files = tar_file_expander([{"url": path, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)


def _describe(exn: Exception) -> str:
    """An exception as one line, without the stream objects webdataset appends to its arguments."""
    if isinstance(exn, OSError) and exn.strerror:
        return f"{type(exn).__name__}: {exn.strerror}"
    first = str(exn.args[0]).split(" @ <", 1)[0] if exn.args else ""
    return f"{type(exn).__name__}: {first}" if first else type(exn).__name__


class Decode:
    """wds.map function: sample -> (image, label, key, shard, ticket); bad data raises _SampleError.

    With `transform` None (GPU decode) the image stays as encoded bytes for the main process.
    """

    def __init__(
        self, transform: Callable | None, *, draft: int | None, num_classes: int | None, labeled: bool
    ):
        self.transform, self.draft, self.num_classes, self.labeled = transform, draft, num_classes, labeled

    def __call__(self, sample: dict) -> tuple:
        key, shard, ticket = sample.get("__key__", "?"), sample["__shard__"], sample["__ticket__"]
        try:
            label = self._label(sample)
            data = next((sample[f] for f in IMAGE_FIELDS if f in sample), None)
            if data is None:
                fields = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"no image field (has {', '.join(fields) or 'nothing'})")
            image = data if self.transform is None else decode_image(data, draft=self.draft)
        except DECODE_ERRORS as e:
            raise _SampleError(ticket, shard, key, e) from e
        if self.transform is not None:
            image = self.transform(image)
        return image, label, key, shard, ticket

    def _label(self, sample: dict) -> int:
        if not self.labeled:
            return -1
        raw = sample.get("cls")
        if raw is None:
            raise ValueError("no .cls label")
        label = int(raw)
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"label {label} outside 0..{(self.num_classes or 1) - 1}")
        return label


def _collate(samples: list[tuple]) -> Item:
    images, labels, keys, shards, tickets = zip(*samples)
    if isinstance(images[0], torch.Tensor):
        # default_collate stacks straight into shared memory inside a worker: no copy on the way out.
        return Item(
            default_collate(list(images)), None, torch.tensor(labels), list(keys), list(shards), list(tickets)
        )
    return Item(None, list(images), torch.tensor(labels), list(keys), list(shards), list(tickets))


class _JobSource:
    """Worker end of the job queue. A `round` is the jobs that arrive without a wait of `flush_after`."""

    def __init__(self, jobs: Any, flush_after: float):
        self.jobs, self.flush_after, self.closed = jobs, flush_after, False

    def get(self, timeout: float | None) -> Job | None:
        """The next job; None when the feed ended (and `closed` is set) or `timeout` passed."""
        waited = 0.0
        while timeout is None or waited < timeout:
            step = 1.0 if timeout is None else min(1.0, timeout - waited)
            try:
                job = self.jobs.get(timeout=step)
            except queue.Empty:
                waited += step
                parent = mp.parent_process()
                if parent is not None and not parent.is_alive():  # orphaned worker: stop
                    self.closed = True
                    return None
                continue
            self.closed = job is None
            return job
        return None

    def round(self, first: Job) -> Iterator[Job]:
        yield first
        while not self.closed and (job := self.get(self.flush_after)) is not None:
            yield job


class ShardDataset(IterableDataset):
    """The per-worker pipeline of webdataset stages over jobs from a queue (train) or a list (val)."""

    def __init__(
        self, *, jobs: list[Job] | None, job_queue: Any, decode: Decode, options: LoaderOptions, shuffle: bool
    ):
        super().__init__()
        self.jobs, self.job_queue, self.decode, self.options = jobs, job_queue, decode, options
        self.shuffle_buffer = options.shuffle_buffer if shuffle else 0

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        seed = None if self.options.seed is None else self.options.seed * 7919 + wid
        rng = random.Random(seed)
        events = _Events()
        if self.jobs is not None:
            yield from self._pipeline(iter(self.jobs[wid::nworkers]), events, rng)
            return
        source = _JobSource(self.job_queue, self.options.flush_after)
        while not source.closed and (first := source.get(None)) is not None:
            yield from self._pipeline(source.round(first), events, rng)

    def _pipeline(self, jobs: Iterator[Job], events: _Events, rng: random.Random) -> Iterator[Item]:
        stages: list[Any] = [lambda: jobs, read_shards(events)]
        if self.shuffle_buffer:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        stages.append(wds.map(self.decode, handler=events.skip))
        stages.append(wds.batched(self.options.batch_size, collation_fn=_collate, partial=True))
        for item in wds.DataPipeline(*stages):
            yield events.attach(item)
        if events.pending:
            yield events.attach(Item.empty())
