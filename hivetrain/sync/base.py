"""What every synchronisation strategy is given, what it offers the training loop, and what it counts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import hivemind
import hivemind.compression.serialization
import numpy as np
import torch
from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
)

from ..options import COMPRESSIONS, SyncOptions


class Uniform8Bit(Uniform8BitQuantization):
    """hivemind's uniform 8-bit codec, with a decoder that works under numpy 2.

    hivemind 1.1.12 reads the codebook size with `int()` of a one-element array, which numpy 2 refuses:
    every 8-bit part then failed to decode on its receiver, which dropped that sender from the round, so
    each peer's "averaged" result held only its own parts and nobody noticed. Installed as hivemind's
    decoder for UNIFORM_8BIT (the decoders are one process-wide table that the averagers' forked
    processes inherit); the bytes on the wire are hivemind's, so peers without the fix still decode
    ours (and fail on theirs, as before)."""

    def extract(self, serialized_tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


hivemind.compression.serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()


def compression(name: str) -> CompressionBase:
    """The hivemind codec for `--compression`: none, fp16, or 8bit (uniform 8-bit quantisation of every
    tensor part of at least 64 Ki values, fp16 for the small ones: biases, BatchNorm, the tail part)."""
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    if name == "8bit":
        return SizeAdaptiveCompression(1 << 16, less=Float16Compression(), greater_equal=Uniform8Bit())
    raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


@dataclass(frozen=True)
class SyncContext:
    """Everything a strategy needs from the peer that builds it.

    Attributes:
        dht, run_id: the run's DHT and name (strategies prefix their DHT keys with it).
        model: the model being trained (on its device).
        param_groups: the optimizer's parameter groups (weight decay split as the recipe says).
        inner_optimizer: builds the local optimizer from parameter groups (the recipe's SGD).
        lr_schedule: the learning-rate multiplier as a function of the global step.
        batchnorm: BatchNorm running statistics, averaged with the model.
        batch: samples per local step; target_global_bsz: samples across all peers per global step.
        total_steps: the run's length in global steps.
        options: the user's `SyncOptions`.
    """

    dht: hivemind.DHT
    run_id: str
    model: torch.nn.Module
    param_groups: list[dict]
    inner_optimizer: Callable[..., torch.optim.Optimizer]
    lr_schedule: Callable[[int], float]
    batchnorm: Sequence[torch.Tensor]
    batch: int
    target_global_bsz: int
    total_steps: int
    options: SyncOptions

    def compression(self) -> CompressionBase:
        return compression(self.options.compression)


@dataclass
class SyncStats:
    """Counters of a strategy, for metrics: rounds, and seconds the training loop spent waiting on them."""

    rounds: int = 0
    failed_rounds: int = 0
    downloads: int = 0  # of the run's state from peers
    version: int = 0  # of the state this peer trains on (rounds applied to it, its own and downloaded)
    wait_s: float = 0.0
    last_round_s: float | None = None  # from when the last round was due until it landed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_wait(self, seconds: float) -> None:
        with self._lock:
            self.wait_s += seconds


class Synchronizer(Protocol):
    """What the training loop calls, whatever the strategy (`hivetrain.sync.make`)."""

    mode: str
    stats: SyncStats

    def step(self, batch_size: int) -> None:
        """Called after `loss.backward()` with the batch's size: update the model, maybe synchronise."""

    def zero_grad(self) -> None:
        """Drop the gradients of a skipped batch."""

    @property
    def global_step(self) -> int:
        """The run's progress in global batches (`target_global_bsz` samples across all peers)."""

    @property
    def lr(self) -> float:
        """The learning rate of the local optimizer now."""

    @property
    def num_peers(self) -> int:
        """Training peers visible in the run (this one included)."""

    def catch_up(self) -> None:
        """Before the first step: take the run's current state from peers when the run is ahead."""

    def finish(self) -> None:
        """After the last step: leave the model in the state the run agrees on."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy (merged into the checkpoint's top level)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a checkpoint's contents."""

    def shutdown(self) -> None:
        """Stop background work and leave the averaging groups."""
