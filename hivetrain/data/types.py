"""The public records of the data pipeline: what the feed gives, what the stream yields, its options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import DataError


@dataclass(frozen=True)
class ShardRef:
    """One shard handed to the pipeline: a local file, its name, the manifest's sample count, and an
    opaque `tag` (the trainer's lease claim) that stays in the main process and comes back in ShardDone.
    """

    path: str
    name: str = ""
    num_samples: int | None = None
    tag: Any = None

    def __post_init__(self) -> None:
        # Absolute paths only: webdataset's opener would treat "pipe:..." or "http:..." as commands/URLs.
        object.__setattr__(self, "path", os.path.abspath(os.fspath(self.path)))
        if not self.name:
            object.__setattr__(self, "name", os.path.basename(self.path))

    @classmethod
    def of(cls, item: ShardRef | str | os.PathLike) -> ShardRef:
        if isinstance(item, ShardRef):
            return item
        if isinstance(item, (str, os.PathLike)):
            return cls(os.fspath(item))
        raise TypeError(f"a shard feed yields ShardRef, str or os.PathLike items, not {type(item).__name__}")


@dataclass(frozen=True)
class ShardDone:
    """Every sample of a shard has been consumed by the training loop (or skipped, and counted).

    Attributes:
        samples: samples delivered in batches and consumed.
        corrupt: samples the tar held that could not be used (undecodable image, bad or missing label).
        missing: samples the manifest promises that the tar did not hold (truncated or damaged shard).
        error: the first read error of the tar itself, if any.
    """

    shard: str
    path: str
    tag: Any
    samples: int
    corrupt: int
    missing: int
    error: str | None = None

    @property
    def skipped(self) -> int:
        return self.corrupt + self.missing

    def __str__(self) -> str:
        return f"shard {self.shard} finished: {self.samples} samples used, {self.skipped} skipped"


@dataclass(frozen=True)
class Batch:
    """Decoded, augmented samples. `images` is float32 [N, 3, S, S], normalised, on the options' device
    (on the GPU with decode="gpu"); `labels` is int64 [N] (-1 if unlabeled), on the same device.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...]
    shards: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class StreamStats:
    """Running totals of a stream, for metrics."""

    shards: int = 0
    samples: int = 0
    corrupt: int = 0
    missing: int = 0
    shard_errors: int = 0

    @property
    def skipped(self) -> int:
        return self.corrupt + self.missing


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are produced.

    Attributes:
        batch_size: samples per batch (the last batch of a stream, or of a burst, may be smaller).
        workers: DataLoader worker processes; 0 reads in the main process.
        shuffle_buffer: samples mixed per worker across shard boundaries (training only; 0 = off).
        decode: "cpu" (PIL in the workers) or "gpu" (nvJPEG in the main process, batches delivered on
            the GPU; falls back to "cpu" with a warning when CUDA is absent).
        device: where batches are delivered ("cpu", "cuda", "cuda:1"); uint8 images travel there and
            are converted and normalised on it.
        pin_memory: pin batches for fast copies to the GPU; None = when `device` is a CUDA device.
        prefetch_factor: items each worker prepares ahead.
        flush_after: seconds a worker waits for its next shard before it empties its shuffle buffer, so
            the training loop never waits on samples held back while the feed is idle (epoch ends).
        persistent_workers: keep validation workers alive between passes.
        seed: makes shuffle order and augmentation reproducible for a given worker count.
        mp_context: multiprocessing start method for the workers (None = the platform default).
    """

    batch_size: int = 256
    workers: int = 2
    shuffle_buffer: int = 2000
    decode: Literal["cpu", "gpu"] = "cpu"
    device: str = "cpu"
    pin_memory: bool | None = None
    prefetch_factor: int = 2
    flush_after: float = 1.0
    persistent_workers: bool = True
    seed: int | None = None
    mp_context: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("workers", 0), ("shuffle_buffer", 0), ("prefetch_factor", 1)):
            if getattr(self, name) < low:
                raise DataError(f"loader option {name} must be at least {low}, not {getattr(self, name)}")
        if self.decode not in ("cpu", "gpu"):
            raise DataError(f"loader option decode must be 'cpu' or 'gpu', not {self.decode!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise DataError(f"loader option device: {self.device!r} is not a torch device") from None
