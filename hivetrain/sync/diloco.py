"""`--sync diloco`: local steps, then an averaged pseudo-gradient applied by an outer Nesterov optimizer,
averaged in the background while the next local steps compute.

The DiLoCo form of local SGD (Douillard et al., 2023; OpenDiLoCo runs it on hivemind). Each peer steps its
own optimizer on its own batches. Every `--local-steps` H steps (on average over the swarm: a round
begins when the run has trained H x batch samples per peer, as hivemind's progress tracker counts them,
so a faster peer contributes more samples, and nobody waits for the slowest), the peers average their
pseudo-gradients, the distance from the run's global parameters to their local ones, weighted by the
samples behind each, and every peer applies the average to its copy of the global parameters with the
outer optimizer (SGD, `--outer-lr`, Nesterov momentum `--outer-momentum`). BatchNorm statistics are
averaged in the same round. The last round of training is a plain average of the local models.

Overlap: a round's all-reduce runs in hivemind's averager process while training goes on. When it lands,
the local parameters move by what the outer step changed, keeping the steps taken meanwhile (the delta
rule: local += new global - snapshot). Training waits only if a round is still running when the next
one is due. A peer sends about two compressed model copies per round, so bytes per sample fall as
1 / (H x batch). The round rules (who applies, who reloads state, what a lone peer does) are pure, in
`hivetrain.sync.rounds`; hivemind does the matchmaking, all-reduce and state download.

hivemind has no outer optimizer of its own (its local-updates mode averages parameters, without outer
momentum), hence this module.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import InvalidStateError
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import NoCompression
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

from . import rounds
from .base import SyncContext, SyncStats

log = logging.getLogger(__name__)

MATCHMAKING_GRACE_S = 2.0
"""A round whose group has not formed this long after its scheduled start is given up when waited for."""
LOAD_STATE_TIMEOUT_S = 600.0
"""How long a download of the run's state may take in all (a stall of a single chunk fails sooner): the
whole model at full precision, over a volunteer's link that carries the others' rounds as well, as
`hivemind.Optimizer`'s `load_state_timeout`."""


def _cpu_copy(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().float().cpu().clone() for t in tensors]


class GlobalState:
    """This peer's copy of the run's global state: parameters, BatchNorm statistics, outer optimizer,
    version, lineage and sample count. Thread-safe: joiners' state downloads read it from another thread.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], batchnorm: Sequence[torch.Tensor], *, lr: float, momentum: float
    ):
        self.lock = threading.Lock()
        self.params = _cpu_copy(params)
        self.batchnorm = _cpu_copy(batchnorm)
        self.outer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.momentum = momentum > 0  # without momentum there are no buffers to share
        self.version = self.lineage = self.total = 0

    @torch.no_grad()
    def step(self, deltas, batchnorm, outcome: rounds.Outcome, *, plain: bool = False) -> None:
        """Fold a (averaged) pseudo-gradient in: the outer optimizer's step, or with `plain` the plain
        average of the local models (global -= delta)."""
        with self.lock:
            if plain:
                for g, d in zip(self.params, deltas):
                    g.sub_(d)
            else:
                for g, d in zip(self.params, deltas):
                    g.grad = d
                self.outer.step()
                for g in self.params:
                    g.grad = None
            self.batchnorm = list(batchnorm)
            self.version, self.lineage, self.total = outcome.version, outcome.lineage, outcome.total

    def export(self) -> tuple[dict[str, int], list[torch.Tensor]]:
        """What a joining peer downloads: metadata, then parameters, outer momentum (if any) and BatchNorm."""
        with self.lock:
            momentum = [
                self.outer.state.get(g, {}).get("momentum_buffer", torch.zeros_like(g)) for g in self.params
            ] * self.momentum
            tensors = [t.clone() for t in (*self.params, *momentum, *self.batchnorm)]
            return dict(version=self.version, lineage=self.lineage, total=self.total), tensors

    @torch.no_grad()
    def adopt(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> bool:
        """Take a state a peer exported; False (and nothing changed) when it has the wrong shape."""
        n, m = len(self.params), len(self.batchnorm)
        try:
            version, lineage, total = (int(metadata[k]) for k in ("version", "lineage", "total"))
        except (TypeError, KeyError, ValueError):
            return False
        k = n * (1 + self.momentum)
        shapes = [t.shape for t in (*self.params, *self.params[: k - n], *self.batchnorm)]
        if len(tensors) != k + m or [t.shape for t in tensors] != shapes:
            return False
        with self.lock:
            for g, t in zip(self.params, tensors[:n]):
                g.copy_(t)
            for g, t in zip(self.params, tensors[n:k]):
                self.outer.state[g]["momentum_buffer"] = t.float().clone()
            self.batchnorm = [t.float().clone() for t in tensors[k:]]
            self.version, self.lineage, self.total = version, lineage, total
        return True

    def state_dict(self, *, unaveraged: int = 0) -> dict[str, Any]:
        with self.lock:
            return dict(
                global_params=[g.clone() for g in self.params], global_bn=[b.clone() for b in self.batchnorm],
                outer=self.outer.state_dict(), version=self.version, lineage=self.lineage,
                total=self.total + unaveraged,
            )  # fmt: skip

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, Any]) -> None:
        with self.lock:
            for g, t in zip(self.params, saved["global_params"]):
                g.copy_(t)
            self.batchnorm = [t.clone() for t in saved["global_bn"]]
            self.outer.load_state_dict(saved["outer"])
            self.version, self.lineage, self.total = (int(saved[k]) for k in ("version", "lineage", "total"))

    @property
    def priority(self) -> float:
        return rounds.sharing_priority(self.total, self.lineage)


@dataclass
class _Round:
    """A round in flight: its control, and the local state it averaged (the snapshot it started from)."""

    control: StepControl
    params: list[torch.Tensor]  # local parameters at the round's start (CPU, float32)
    batchnorm: list[torch.Tensor]
    samples: int
    started: float  # monotonic
    deadline: float  # monotonic: give up waiting for it then
    final: bool = False  # the last round: a plain average, no outer step


class DiLoCo:
    """Local optimizer steps with periodic, overlapped outer steps (see the module docstring)."""

    mode = "diloco"

    def __init__(self, context: SyncContext):
        c, o = context, context.options
        self._context, self._options = c, o
        self._params = [p for group in c.param_groups for p in group["params"]]
        self._batchnorm = list(c.batchnorm)
        self._inner = c.inner_optimizer(c.param_groups)
        self._base_lrs = [group["lr"] for group in self._inner.param_groups]
        self.state = GlobalState(self._params, self._batchnorm, lr=o.outer_lr, momentum=o.outer_momentum)
        self._peer_id = c.dht.peer_id.to_base58()
        self.local_steps = o.local_steps or rounds.default_local_steps(c.total_steps)
        log.info(
            "diloco: averaging every %d local steps (swarm average), outer lr %g, momentum %g, %s on the wire",
            self.local_steps, o.outer_lr, o.outer_momentum, o.compression,
        )  # fmt: skip
        self._since = 0  # this peer's samples not yet folded into the global state
        self._step_floor = 0  # the global step never goes back, whatever a round's count says
        self._round: _Round | None = None
        self._intervals: list[float] = []  # seconds between recent rounds
        self._durations: list[float] = []  # seconds recent rounds took
        self._last_begin: float | None = None
        self._timing = rounds.RoundTiming()
        self.stats = SyncStats()
        self._tracker = ProgressTracker(
            c.dht, f"{c.run_id}_diloco", target_batch_size=self.local_steps * c.batch, start=True,
            min_refresh_period=0.5, max_refresh_period=5.0,
        )  # fmt: skip
        averaged = [torch.zeros_like(g) for g in self.state.params] + [
            b.clone() for b in self.state.batchnorm
        ]
        self._averager = _Averager(
            self.state, averaged, dht=c.dht, prefix=f"{c.run_id}_diloco", start=True,
            min_matchmaking_time=o.matchmaking_time, request_timeout=min(3.0, o.matchmaking_time / 2),
            allreduce_timeout=o.averaging_timeout, compression=c.compression(), state_compression=NoCompression(),
        )  # fmt: skip
        self._set_lr()

    # ---- what the training loop calls -----------------------------------------------------------------

    def step(self, batch_size: int) -> None:
        """One local optimizer step; then maybe land the round in flight and maybe begin the next."""
        self._inner.step()
        self._inner.zero_grad()
        self._since += batch_size
        if self._round is not None and self._round.control.done():
            self._land()
        peers = self.num_peers
        self._tracker.target_batch_size = self.local_steps * self._context.batch * peers
        in_round = self._since - (self._round.samples if self._round else 0)
        self._tracker.report_local_progress(self._tracker.local_progress.epoch, in_round)
        if self._tracker.ready_to_update_epoch:
            self._begin(peers)
        self._set_lr()

    def zero_grad(self) -> None:
        self._inner.zero_grad()

    @property
    def global_step(self) -> int:
        step = rounds.global_step(
            total=self.state.total, local_since=self._since, peers=self.num_peers,
            target_global_bsz=self._context.target_global_bsz,
        )  # fmt: skip
        self._step_floor = max(self._step_floor, step)
        return self._step_floor

    @property
    def lr(self) -> float:
        return self._inner.param_groups[0]["lr"]

    @property
    def num_peers(self) -> int:
        return max(1, self._tracker.global_progress.num_peers)

    def catch_up(self) -> None:
        """A late joiner takes the run's global state before its first step."""
        self._tracker.fetched_global_progress_this_epoch.wait(timeout=10.0)
        if self._tracker.global_progress.epoch > self._tracker.local_progress.epoch:
            log.info("the run is at round %d: downloading its state from peers", self._tracker.global_epoch)
            if self._load_from_peers():
                log.info("loaded state from peers: now at global step %d", self.global_step)

    def finish(self) -> None:
        """Land the round in flight, then average once more, plainly (no outer step: momentum would
        carry the model on past the end of the schedule), so that the peers end on one model."""
        if self._round is not None:
            self._wait_and_land()
        if self.num_peers > 1 and self._since > 0:
            self._begin(self.num_peers, final=True)
            if self._round is not None:
                self._wait_and_land()

    # ---- rounds ---------------------------------------------------------------------------------------

    def _begin(self, peers: int, *, final: bool = False) -> None:
        """Start a round: snapshot the local state, load the pseudo-gradient, average in the background."""
        if self._round is not None:  # the last round is late: training waits for it
            self._wait_and_land()
        now = time.monotonic()
        if self._last_begin is not None:
            self._intervals = [*self._intervals[-4:], now - self._last_begin]
        self._last_begin = now
        with self._tracker.pause_updates():
            self._tracker.update_epoch(self._tracker.local_progress.epoch + 1)
        params, batchnorm = _cpu_copy(self._params), _cpu_copy(self._batchnorm)
        s = self.state
        if peers <= 1:  # nobody to average with: an outer step of its own, at once
            lineage = rounds.next_lineage(s.lineage, s.version, alone=self._peer_id)
            outcome = rounds.Outcome("apply-alone", s.version + 1, lineage, s.total + self._since)
            self._apply(outcome, params, batchnorm, self._since, averaged=False)
            return
        with torch.no_grad(), self._averager.get_tensors() as tensors:
            for tensor, g, x in zip(tensors, s.params, params):
                torch.sub(g, x, out=tensor)
            for tensor, b in zip(tensors[len(params) :], batchnorm):
                tensor.copy_(b)
        interval = sum(self._intervals) / len(self._intervals) if self._intervals else None
        matchmaking = self._timing.matchmaking_s(interval, self._options.matchmaking_time)
        timeout = self._timing.timeout_s(self._durations, matchmaking, self._options.averaging_timeout)
        control = self._averager.step(
            gather=dict(version=s.version, lineage=s.lineage, samples=self._since, total=s.total),
            weight=float(max(self._since, 1)), scheduled_time=get_dht_time() + matchmaking, timeout=timeout,
            allow_retries=False, wait=False,
        )  # fmt: skip
        self._round = _Round(control, params, batchnorm, self._since, now, now + matchmaking + timeout, final)

    def _wait_and_land(self) -> None:
        """Wait for the round in flight: while its all-reduce runs (until its deadline), but not for a
        group that has not formed by the end of its matchmaking (its partners are gone or late)."""
        started = time.monotonic()
        current = self._round
        while not current.control.done() and time.monotonic() < current.deadline:
            forming = current.control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)
            if forming and get_dht_time() > current.control.scheduled_time + MATCHMAKING_GRACE_S:
                _cancel(current.control)
                break
            time.sleep(0.02)
        self.stats.add_wait(time.monotonic() - started)
        self._land()

    def _land(self) -> None:
        """The round in flight finished (or failed): do what `rounds.after_round` decides."""
        current, self._round = self._round, None
        try:
            gathered = current.control.result(timeout=0)
        except Exception as e:
            log.debug("averaging round failed: %r", e)
            _cancel(current.control)
            gathered = None
        s = self.state
        outcome = rounds.after_round(
            version=s.version, lineage=s.lineage, total=s.total, samples=current.samples, gathered=gathered,
            peers=self.num_peers, peer_id=self._peer_id,
        )  # fmt: skip
        if gathered is None:
            self.stats.failed_rounds += 1
        else:
            self._durations = [*self._durations[-4:], time.monotonic() - current.started]
            self.stats.last_round_s = self._durations[-1]
        log.debug("round at version %d: %s, %d member(s)", s.version, outcome.action, outcome.members)
        if outcome.action == "skip" or (current.final and outcome.action == "apply-alone"):
            return  # contributes to the next round (or, at the end, keeps its own model)
        if outcome.action == "load":
            log.info("this peer missed a round: taking the run's state from peers")
            if self._load_from_peers(current.params, current.batchnorm):
                self._since -= current.samples
            return
        self._apply(
            outcome, current.params, current.batchnorm, current.samples, averaged=outcome.action == "apply",
            plain=current.final,
        )  # fmt: skip

    def _apply(
        self, outcome, params, batchnorm, samples: int, *, averaged: bool, plain: bool = False
    ) -> None:
        """Fold the round into the global state (the averaged pseudo-gradient, or this peer's own), move
        the local state by what the global state moved, count the round's samples as averaged."""
        if averaged:
            with self._averager.get_tensors() as tensors:
                deltas = [t.clone() for t in tensors[: len(params)]]
                batchnorm_now = [t.clone() for t in tensors[len(params) :]]
        else:
            deltas, batchnorm_now = [g - x for g, x in zip(self.state.params, params)], batchnorm
        self.state.step(deltas, batchnorm_now, outcome, plain=plain)
        self._since -= samples
        self._rebase(params, batchnorm)
        self._averager.state_sharing_priority = self.state.priority
        self.stats.rounds += 1

    @torch.no_grad()
    def _rebase(self, params, batchnorm) -> None:
        """Local state += (global now - local at the round's start): keep the steps taken meanwhile."""
        for p, g, x in zip(self._params, self.state.params, params):
            p.add_((g - x).to(p.device, p.dtype))
        for b, g, x in zip(self._batchnorm, self.state.batchnorm, batchnorm):
            b.add_((g - x).to(b.device, b.dtype))

    def _load_from_peers(self, params=None, batchnorm=None) -> bool:
        """Download the run's global state; the local state becomes it plus the steps since `params`."""
        started = time.monotonic()
        download = self._averager.load_state_from_peers(wait=False, timeout=self._options.averaging_timeout)
        try:
            loaded = download.result(timeout=LOAD_STATE_TIMEOUT_S)
        except TimeoutError:
            download.cancel()
            loaded = None
        self.stats.add_wait(time.monotonic() - started)
        if loaded is None:
            log.warning("could not download the run's state from any peer; training on")
            return False
        params = params if params is not None else _cpu_copy(self._params)
        batchnorm = batchnorm if batchnorm is not None else _cpu_copy(self._batchnorm)
        if not self.state.adopt(*loaded):
            log.warning("a peer sent a state of the wrong shape; ignored")
            return False
        self._rebase(params, batchnorm)
        with self._tracker.pause_updates():
            self._tracker.update_epoch(max(self._tracker.global_epoch, self.state.version))
        self._averager.state_sharing_priority = self.state.priority
        return True

    def _set_lr(self) -> None:
        factor = self._context.lr_schedule(self.global_step)
        for group, base in zip(self._inner.param_groups, self._base_lrs):
            group["lr"] = base * factor

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return dict(optimizer=self._inner.state_dict(), diloco=self.state.state_dict(unaveraged=self._since))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("diloco")
        if saved is None:  # a checkpoint of another mode: keep its model and its place in the schedule
            log.info("the checkpoint holds no DiLoCo state: its model starts the rounds")
            self.state.load_state_dict(
                dict(self.state.state_dict(), global_params=_cpu_copy(self._params), version=0, lineage=0,
                     total=int(state.get("global_step", 0)) * self._context.target_global_bsz)
            )  # fmt: skip
        else:
            self._inner.load_state_dict(state["optimizer"])
            self.state.load_state_dict(saved)
        with self._tracker.pause_updates():
            self._tracker.update_epoch(self.state.version)
        self._averager.state_sharing_priority = self.state.priority
        self._set_lr()

    def shutdown(self) -> None:
        if self._round is not None:
            _cancel(self._round.control)
        self._averager.shutdown()
        self._tracker.shutdown()


def _cancel(control: StepControl) -> None:
    """Stop a round's matchmaking (or forget its all-reduce) unless it already ended."""
    if not control.done():
        with contextlib.suppress(InvalidStateError):
            control.cancel()


class _Averager(DecentralizedAverager):
    """hivemind's averager; what joiners download is the strategy's `GlobalState`."""

    def __init__(self, state: GlobalState, averaged_tensors, **kwargs):
        self._global_state = state
        super().__init__(averaged_tensors, **kwargs)

    def get_current_state(self):
        metadata, tensors = self._global_state.export()
        return metadata, tensors, None
