"""The main-process side: ShardStream feeds shard jobs to the workers and turns their items into
batches and ShardDone events; helpers build streams from a manifest."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from ..errors import DataError
from ..transforms import DeviceDecoder, Recipe, recipe_for
from .types import Batch, LoaderOptions, ShardDone, ShardRef, StreamStats
from .worker import Decode, Item, Job, ShardDataset

if TYPE_CHECKING:
    from shardtool.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class _Open:
    ref: ShardRef
    read: int | None = None
    error: str | None = None
    consumed: int = 0
    corrupt: int = 0


class _Tracker:
    """Main-process bookkeeping: which shards are open, and when each has been fully consumed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        self._next = 0
        self._stats = StreamStats()

    def register(self, ref: ShardRef) -> Job:
        with self._lock:
            ticket, self._next = self._next, self._next + 1
            self._open[ticket] = _Open(ref)
        return Job(ticket, ref.path, ref.name)

    def update(self, item: Item) -> list[ShardDone]:
        with self._lock:
            for report in item.reports:
                self._open[report.ticket].read, self._open[report.ticket].error = report.read, report.error
            for ticket, n in item.corrupt.items():
                self._open[ticket].corrupt += n
            touched = {r.ticket for r in item.reports} | set(item.corrupt)
            self._stats = dataclasses.replace(
                self._stats, corrupt=self._stats.corrupt + sum(item.corrupt.values())
            )
            return self._finish(touched)

    def consume(self, tickets: list[int]) -> list[ShardDone]:
        with self._lock:
            for ticket, n in Counter(tickets).items():
                self._open[ticket].consumed += n
            self._stats = dataclasses.replace(self._stats, samples=self._stats.samples + len(tickets))
            return self._finish(set(tickets))

    def _finish(self, tickets: set[int]) -> list[ShardDone]:
        done = []
        for ticket in sorted(tickets):
            s = self._open[ticket]
            if s.read is None or s.consumed + s.corrupt < s.read:
                continue
            del self._open[ticket]
            expected = s.ref.num_samples
            if expected is not None and s.read > expected:
                log.warning("%s holds %d samples, more than the %d expected", s.ref.path, s.read, expected)
            missing = max(0, expected - s.read) if expected is not None else 0
            event = ShardDone(s.ref.name, s.ref.path, s.ref.tag, s.consumed, s.corrupt, missing, s.error)
            self._stats = dataclasses.replace(
                self._stats,
                shards=self._stats.shards + 1,
                missing=self._stats.missing + missing,
                shard_errors=self._stats.shard_errors + (s.error is not None),
            )
            if event.skipped:
                log.warning("%s (%d corrupt, %d missing)", event, event.corrupt, event.missing)
            else:
                log.debug("%s", event)
            done.append(event)
        return done

    def unfinished(self) -> list[ShardRef]:
        with self._lock:
            return [s.ref for s in self._open.values()]

    @property
    def stats(self) -> StreamStats:
        return self._stats


class _Feeder:
    """Moves the feed into the job queue from a thread, so that a slow feed (a DHT claim, a download)
    never blocks the training loop; the bounded queue keeps claims only a few shards ahead of reading.
    """

    def __init__(self, feed: Iterable, tracker: _Tracker, jobs: Any, consumers: int):
        self.feed, self.tracker, self.jobs, self.consumers = feed, tracker, jobs, consumers
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hivetrain-shard-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.feed:
                if not self._put(self.tracker.register(ShardRef.of(item))):
                    return
        except Exception as e:
            self.error = e
            log.debug("shard feed failed: %s", e)
        for _ in range(self.consumers):
            self._put(None)

    def _put(self, job: Job | None) -> bool:
        while not self._stop.is_set():
            try:
                self.jobs.put(job, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def stop(self) -> None:
        """Stop feeding and wake every worker still waiting for a shard."""
        self._stop.set()
        try:
            while True:
                self.jobs.get_nowait()
        except queue.Empty:
            pass
        for _ in range(self.consumers):
            try:
                self.jobs.put_nowait(None)
            except queue.Full:
                break
        if hasattr(self.jobs, "cancel_join_thread"):  # never let undelivered jobs block interpreter exit
            self.jobs.cancel_join_thread()


class ShardStream:
    """Decoded, augmented batches from shard files, with a `ShardDone` event per finished shard.

    Iterating yields `Batch` items and, once a shard's last sample has been consumed (when the loop asks
    for the next item after the batch that held it), a `ShardDone`::

        options = LoaderOptions(workers=2, device="cuda")
        stream = ShardStream(feed, recipe_for(manifest), options, train=True)
        for item in stream:
            if isinstance(item, ShardDone):
                assigner.complete(item.tag)
                continue
            train_step(item.images, item.labels)  # both already on the GPU

    `train=True`: `feed` is any iterable of ShardRef or paths, read lazily (a few shards ahead) by a
    thread while the stream runs; one pass. `train=False`: `feed` is a finite list read in order with
    no shuffle; every iteration is a new pass over it, with the same batches each time.
    """

    def __init__(
        self,
        feed: Iterable[ShardRef | str | os.PathLike],
        recipe: Recipe,
        options: LoaderOptions | None = None,
        *,
        train: bool,
        num_classes: int | None = None,
        labeled: bool = True,
    ):
        options = options or LoaderOptions()
        self.options, self.train = options, train
        self._tracker = _Tracker()
        self._started = False
        self._recipe, self._device = recipe, torch.device(options.device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise DataError(f"loader option device is {options.device!r}, but CUDA is not available here")
        self._device_decoder = self._gpu_decoder(recipe, options, train)
        if self._device_decoder is not None:
            self._device = self._device_decoder.device
        decode = Decode(
            None if self._device_decoder else recipe.image_transform(train=train),
            draft=recipe.draft_size(train=train),
            num_classes=num_classes,
            labeled=labeled,
        )
        workers = options.workers
        ctx = mp.get_context(options.mp_context) if workers else None
        if train:
            self._feed, self._refs = feed, None
            self._jobs = ctx.Queue(maxsize=2 * workers) if ctx else queue.Queue(maxsize=2)
            jobs = None
        else:
            self._feed, self._jobs = None, None
            self._refs = [ShardRef.of(x) for x in feed]
            jobs = [Job(i, r.path, r.name) for i, r in enumerate(self._refs)]
        dataset = ShardDataset(jobs=jobs, job_queue=self._jobs, decode=decode, options=options, shuffle=train)
        pin = self._device.type == "cuda" if options.pin_memory is None else options.pin_memory
        self._loader: DataLoader | None = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=pin and self._device_decoder is None,
            prefetch_factor=options.prefetch_factor if workers else None,
            persistent_workers=bool(workers) and not train and options.persistent_workers,
            multiprocessing_context=ctx,
            generator=None if options.seed is None else torch.Generator().manual_seed(options.seed),
            # Training takes items from whichever worker has one: a worker waiting for its next shard
            # must not hold back others' batches (their shards' completion may be what the feed awaits).
            in_order=not train,
        )

    @staticmethod
    def _gpu_decoder(recipe: Recipe, options: LoaderOptions, train: bool) -> DeviceDecoder | None:
        if options.decode != "gpu":
            return None
        if not torch.cuda.is_available():
            log.warning(
                "decode='gpu' asked for, but CUDA is not available (torch %s): decoding JPEGs with PIL "
                "in the loader workers instead",
                torch.__version__,
            )
            return None
        device = torch.device(options.device)
        return DeviceDecoder(recipe, train=train, device=device if device.type == "cuda" else "cuda")

    @property
    def stats(self) -> StreamStats:
        """Totals so far: shards finished, samples consumed, samples skipped (corrupt, missing)."""
        return self._tracker.stats

    def unfinished(self) -> list[ShardRef]:
        """Shards taken from the feed whose completion has not been reported (in flight, or dropped when
        the stream stopped early): the trainer's leases on them should be left to expire or released."""
        return self._tracker.unfinished()

    def batches(self, on_done: Callable[[ShardDone], Any] | None = None) -> Iterator[Batch]:
        """Only the batches; `on_done` (if given) is called with each ShardDone as it happens."""
        for item in self:
            if isinstance(item, Batch):
                yield item
            elif on_done is not None:
                on_done(item)

    def close(self) -> None:
        """Stop the worker processes now (also happens when the stream is garbage collected)."""
        self._loader = None

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Batch | ShardDone]:
        if self._loader is None:
            raise DataError("this ShardStream is closed")
        feeder = None
        if self.train:
            if self._started:
                raise DataError("a training ShardStream reads its feed once; make a new one for a new feed")
            self._started = True
        else:
            self._tracker = _Tracker()
            for ref in self._refs:
                self._tracker.register(ref)
        it = iter(self._loader)  # forks the workers before the feeder thread exists
        try:
            if self.train:
                feeder = _Feeder(self._feed, self._tracker, self._jobs, max(1, self.options.workers))
                feeder.start()
            for item in it:
                if feeder is not None and feeder.error is not None:
                    raise feeder.error
                if self._device_decoder is not None and item.raw:
                    item = self._decode_on_device(item)
                elif item.images is not None:
                    item.images = self._recipe.normalize(item.images.to(self._device, non_blocking=True))
                yield from self._tracker.update(item)
                if item.keys:
                    labels = item.labels.to(self._device, non_blocking=True)
                    yield Batch(item.images, labels, tuple(item.keys), tuple(item.shards))
                    yield from self._tracker.consume(item.tickets)
            if feeder is not None and feeder.error is not None:
                raise feeder.error
            if left := self._tracker.unfinished():
                log.error("stream ended with %d shards unaccounted for: %s", len(left), left[:3])
        finally:
            if feeder is not None:
                feeder.stop()
            del it  # shuts the workers down (persistent validation workers stay)

    def _decode_on_device(self, item: Item) -> Item:
        assert self._device_decoder is not None
        images, failed = self._device_decoder(item.raw)
        corrupt = Counter(item.corrupt)
        for i in failed:
            corrupt[item.tickets[i]] += 1
            log.warning(
                "skipping corrupt sample: %s: sample %s: cannot decode image", item.shards[i], item.keys[i]
            )
        keep = [i for i in range(len(item.keys)) if i not in set(failed)]
        return Item(
            images,
            None,
            item.labels[keep],
            [item.keys[i] for i in keep],
            [item.shards[i] for i in keep],
            [item.tickets[i] for i in keep],
            item.reports,
            dict(corrupt),
        )


def shard_refs(manifest: Manifest, split: str, shard_dir: str | os.PathLike | None = None) -> list[ShardRef]:
    """A split's shards as local refs, in manifest order, with their sample counts.

    Raises:
        DataError: a shard file is missing from `shard_dir` (default: the manifest's folder).
    """
    base = Path(shard_dir) if shard_dir is not None else manifest.base_dir
    if base is None:
        raise DataError(
            f"{manifest.origin}: the manifest is not local; give the folder that holds the shards"
        )
    shards = manifest.split(split).shards
    missing = [s.name for s in shards if not (base / s.name).is_file()]
    if missing:
        raise DataError(
            f"{base}: {len(missing)} of {len(shards)} {split} shards are missing (first: {missing[0]}); "
            f"fetch them with `shardtool fetch --split {split}`"
        )
    return [ShardRef(base / s.name, s.name, s.num_samples) for s in shards]


def val_stream(
    manifest: Manifest,
    shard_dir: str | os.PathLike | None = None,
    *,
    split: str = "val",
    options: LoaderOptions | None = None,
    image_size: int | None = None,
) -> ShardStream:
    """The validation stream of a manifest's split from local files: every sample once per pass, in a
    fixed order, evaluation transforms, labels checked against the class list."""
    return ShardStream(
        shard_refs(manifest, split, shard_dir),
        recipe_for(manifest, image_size),
        options,
        train=False,
        num_classes=manifest.num_classes or None,
        labeled=manifest.split(split).labeled,
    )


def train_stream(
    manifest: Manifest,
    feed: Iterable[ShardRef | str | os.PathLike],
    *,
    split: str = "train",
    options: LoaderOptions | None = None,
    image_size: int | None = None,
    flip: bool = True,
) -> ShardStream:
    """The training stream over `feed`, with the manifest's recipe (`flip=False`: no horizontal flips),
    class count and per-shard sample counts (filled into refs that lack them, so truncated shards are
    noticed)."""
    counts = {s.name: s.num_samples for s in manifest.split(split).shards}

    def with_counts() -> Iterator[ShardRef]:
        for item in feed:
            ref = ShardRef.of(item)
            if ref.num_samples is None:
                ref = dataclasses.replace(ref, num_samples=counts.get(ref.name))
            yield ref

    return ShardStream(
        with_counts(),
        recipe_for(manifest, image_size, flip=flip),
        options,
        train=True,
        num_classes=manifest.num_classes or None,
        labeled=manifest.split(split).labeled,
    )
