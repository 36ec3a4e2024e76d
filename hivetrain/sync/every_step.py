"""`--sync every-step`: hivemind.Optimizer averages gradients at every global step (all peers step alike).

Each global step gathers `target_global_bsz` samples' gradients from all peers, averages them (float16 on
the wire) and steps the same optimizer on every peer; the parameters, optimizer statistics and BatchNorm
buffers are averaged every global step as well, so peers that drift (or join) converge. This is the
classic data-parallel form and the most bytes per sample: about two model copies per global step.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import hivemind
import torch

from .base import SyncContext, SyncStats

log = logging.getLogger(__name__)


class EveryStep:
    """Gradient averaging every global step through `hivemind.Optimizer` (see the module docstring)."""

    mode = "every-step"

    def __init__(self, context: SyncContext):
        c, o = context, context.options
        self._optimizer = _Optimizer(
            dht=c.dht,
            run_id=c.run_id,
            target_batch_size=c.target_global_bsz,
            batch_size_per_step=c.batch,
            params=c.param_groups,
            optimizer=c.inner_optimizer,
            scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=c.lr_schedule),
            matchmaking_time=o.matchmaking_time,
            averaging_timeout=o.averaging_timeout,
            extra_tensors=c.batchnorm,
            # matchmaking wants its requests to time out well within one matchmaking round
            averager_opts=dict(request_timeout=min(3.0, o.matchmaking_time / 2)),
            grad_compression=c.compression(),
            state_averaging_compression=c.compression(),
            load_state_compression=c.compression(),
            verbose=False,
        )
        self.stats = SyncStats()

    # ---- what the training loop calls -----------------------------------------------------------------

    def step(self, batch_size: int) -> None:
        """Accumulate this batch's gradients; averages and steps when the swarm has a global batch.

        A call that ends a global step waits for the gradients' all-reduce: it counts as waiting on
        averaging (the optimizer step it also makes takes milliseconds of it)."""
        epoch, started = self._optimizer.local_epoch, time.perf_counter()
        self._optimizer.step(batch_size=batch_size)
        if self._optimizer.local_epoch != epoch:
            self.stats.add_wait(time.perf_counter() - started)
            self.stats.rounds += 1
        self.stats.version = self._optimizer.local_epoch
        self._optimizer.zero_grad()

    def zero_grad(self) -> None:
        self._optimizer.zero_grad()

    @property
    def global_step(self) -> int:
        return self._optimizer.local_epoch

    @property
    def lr(self) -> float:
        return self._optimizer.param_groups[0]["lr"]

    @property
    def num_peers(self) -> int:
        return self._optimizer.tracker.global_progress.num_peers

    def catch_up(self) -> None:
        """A late joiner downloads the run's current state before it computes a single gradient."""
        tracker = self._optimizer.tracker
        tracker.fetched_global_progress_this_epoch.wait(timeout=10.0)
        progress = tracker.global_progress  # its epoch is the most advanced peer's (ours when alone)
        if progress.epoch > self._optimizer.local_epoch:
            log.info("the run is at global step %d: downloading its state from peers", progress.epoch)
            self._optimizer.load_state_from_peers()
            self.stats.downloads += 1
            log.info("loaded state from peers: now at global step %d", self._optimizer.local_epoch)

    def finish(self) -> None:
        """Nothing to do at the end of training: every global step already left the peers in agreement."""

    # ---- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return dict(
            optimizer=self._optimizer.state_dict(),
            scheduler=self._optimizer.state_averager.scheduler.state_dict(),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state["optimizer"])

    def shutdown(self) -> None:
        self._optimizer.shutdown()


class _Optimizer(hivemind.Optimizer):
    """hivemind.Optimizer that does not look for averaging partners while no other peer is training.

    hivemind pre-schedules matchmaking for every global step, alone or not; a lone peer then spends a
    good share of a small machine's CPU in its averager processes on rounds that are cancelled for lack
    of partners (measured: 36% fewer samples/s on 2 cores). The schedule resumes as soon as the progress
    tracker sees a second peer. Overrides two internal hooks of hivemind 1.1.12 (pinned in pyproject).
    """

    def _maybe_schedule_gradient_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_state_averaging()
