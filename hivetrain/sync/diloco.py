"""`--sync diloco`: local steps, then an averaged pseudo-gradient applied by an outer Nesterov optimizer,
averaged in the background while the next local steps compute.

The DiLoCo form of local SGD (Douillard et al., 2023; OpenDiLoCo runs it on hivemind). Each peer steps its
own optimizer on its own batches. Every `--local-steps` H steps (on average over the swarm: a round
begins when the run has trained H x batch samples per peer, as hivemind's progress tracker counts them,
so a faster peer contributes more samples, and nobody waits for the slowest), the peers average their
pseudo-gradients, the distance from the run's global parameters to their local ones, weighted by the
samples behind each, and every peer applies the average to its copy of the global parameters with the
outer optimizer (SGD, `--outer-lr`, Nesterov momentum `--outer-momentum`). BatchNorm statistics are
averaged in the same round. The last round of training is a plain average of the local models; a
peer that takes part in another's last round ends there too, so that the peers end on one model.

Overlap: a round's all-reduce runs in hivemind's averager process while training goes on. When it lands,
the local parameters move by what the outer step changed, keeping the steps taken meanwhile (the delta
rule: local += new global - snapshot). Training waits only if a round is still running when the next
one is due. The group is formed ahead of time: matchmaking begins a window before the round is due (at
the swarm's estimate of when its samples are in, the same for every peer), and the all-reduce starts
once the round is due and its group formed (on loopback, a median 1.4-3 s after the round was due).
The delay matters: steps taken on a peer's own between a round's snapshot and its landing are grafted
onto the average, and local SGD tolerates that badly once the delay nears the time between rounds
(`bench/overlap.py`: 2 models averaged every 8 local steps, 98.3%; landing 8 steps late, 97.0% with a
wide spread; 2 steps late, 98.8%). A peer sends about two compressed model copies per round, so bytes
per sample fall as 1 / (H x batch). The round rules (who applies, who reloads state, what a lone peer
does) are pure, in `hivetrain.sync.rounds`; hivemind does the matchmaking, all-reduce and state download.

Catching up: a peer that must take the run's state (a joiner, or a member that missed a round) downloads
it in the background and meanwhile takes part in the rounds with no weight, keeping each round's
averaged step; when the download lands, the steps that follow it are applied on it. However long the
download takes next to the time between rounds, the peer is then in step (without this, a download that
outlasts a round is behind when it lands, and the peer downloads again at every round, for ever).

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
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.compression import NoCompression
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

from . import rounds
from .base import SyncContext, SyncStats

log = logging.getLogger(__name__)

FINAL_MATCHMAKING_S = 10.0
"""The least time the last round waits for partners: the others notice it through the progress tracker
(refreshed every 5 s at most), and join it however soon they would have averaged otherwise."""
FINAL_ATTEMPTS = 3
"""How many times the last round is tried before a peer that found no partner ends on its own model."""
NEXT_CHUNK_TIMEOUT_S = 10.0
"""A member that sends nothing for this long during an all-reduce or a state download is dropped from it
(hivemind's `next_chunk_timeout`). Without it, a partner that gave the round up just as its group formed
held the others for the whole averaging timeout (60 s), and the run drifted apart meanwhile. One part of
an all-reduce (512 KB) takes ~0.04 s over 100 Mbit/s, ~1 s over 4 Mbit/s."""
MAX_RECORDED_ROUNDS = 16
"""The most rounds a catching-up peer keeps (each a model's worth of averaged step) while its download
is in flight; a download slower than that many rounds is replaced by a newer one."""
LOAD_STATE_TIMEOUT_S = 600.0
"""How long the end of training waits for a download of the run's state still in flight (training does
not wait for one; a stall of a single chunk fails it sooner): the whole model at full precision over a
volunteer's link that carries the others' rounds as well, as `hivemind.Optimizer`'s `load_state_timeout`."""


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

    def snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the global parameters and BatchNorm statistics."""
        with self.lock:
            return _cpu_copy(self.params), _cpu_copy(self.batchnorm)

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
class _CatchUp:
    """A download of the run's state in flight, and the rounds that landed since it began (with their
    averaged steps), to be applied on it when it lands."""

    download: Any  # hivemind's future of (metadata, tensors)
    params: list[torch.Tensor]  # local state when the peer fell behind: what its progress is counted from
    batchnorm: list[torch.Tensor]
    samples: int  # this peer's samples that went into a state it does not hold: dropped once caught up
    started: float  # monotonic
    steps: list[tuple[rounds.Outcome, list[torch.Tensor], list[torch.Tensor], bool]] = field(
        default_factory=list
    )


@dataclass
class _Round:
    """A round in flight: its control, and the local state it averaged (the snapshot it started from)."""

    control: StepControl
    params: list[torch.Tensor]  # local parameters at the round's start (global ones if weightless)
    batchnorm: list[torch.Tensor]
    samples: int
    started: float  # monotonic
    deadline: float  # monotonic: give up waiting for it then
    final: bool = False  # the last round: a plain average, no outer step
    weightless: bool = False  # taken part in while catching up: receives the average, adds nothing
    base: tuple[int, int, int] = (0, 0, 0)  # weightless: version, lineage, total of the state it began on


@dataclass
class _Scheduled:
    """A round whose matchmaking began ahead of time: its group forms while training goes on, and its
    all-reduce waits for the trigger given when the round is due (`hivemind`'s `require_trigger`)."""

    control: StepControl
    weightless: bool
    base: tuple[int, int, int]  # version, lineage, total of the state it was gathered with
    deadline: float  # monotonic


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
        self._scheduled: _Scheduled | None = None
        self._catching_up: _CatchUp | None = None
        self._ended = False  # a last round landed: the run's model is final
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
        # hivemind looks for partners until max(scheduled time, now + min_matchmaking_time): the floor is
        # the least window a round gets (`RoundTiming`), so that the window each round is scheduled with
        # holds (with the configured 15 s as the floor, rounds due every few seconds never formed)
        least = min(o.matchmaking_time, self._timing.least_s)
        self._averager = _Averager(
            self.state, averaged, dht=c.dht, prefix=f"{c.run_id}_diloco", start=True,
            min_matchmaking_time=least, request_timeout=min(3.0, 0.75 * least), allreduce_timeout=o.averaging_timeout,
            next_chunk_timeout=NEXT_CHUNK_TIMEOUT_S, compression=c.compression(), state_compression=NoCompression(),
        )  # fmt: skip
        self._set_lr()

    # ---- what the training loop calls -----------------------------------------------------------------

    def step(self, batch_size: int) -> None:
        """One local optimizer step; then maybe land the round in flight and maybe begin the next."""
        self._inner.step()
        self._inner.zero_grad()
        self._since += batch_size
        self._poll(in_round=self._since - (self._round.samples if self._round else 0))
        self._set_lr()

    def _poll(self, *, in_round: int) -> None:
        """Land the round in flight if it is done, report progress, begin a round if one is due, and
        finish catching up if the download has landed."""
        if self._round is not None and self._round.control.done():
            self._land()
        peers = self.num_peers
        self._tracker.target_batch_size = self.local_steps * self._context.batch * peers
        self._tracker.report_local_progress(self._tracker.local_progress.epoch, in_round)
        if self._tracker.ready_to_update_epoch and not self._ended:
            self._begin(peers)
        if self._catching_up is not None and self._catching_up.download.done():
            self._finish_catching_up()
        if self._round is None and self._scheduled is None and not self._ended and peers > 1:
            self._maybe_schedule()
        self.stats.version = self.state.version

    def zero_grad(self) -> None:
        self._inner.zero_grad()

    @property
    def global_step(self) -> int:
        step = rounds.global_step(
            total=self.state.total, local_since=self._since, peers=self.num_peers,
            target_global_bsz=self._context.target_global_bsz,
        )  # fmt: skip
        self._step_floor = max(self._step_floor, step, self._context.total_steps if self._ended else 0)
        return self._step_floor

    @property
    def lr(self) -> float:
        return self._inner.param_groups[0]["lr"]

    @property
    def num_peers(self) -> int:
        return max(1, self._tracker.global_progress.num_peers)

    def catch_up(self) -> None:
        """A late joiner takes the run's global state before its first step (its own model is the
        initial one: nothing of it is worth training on meanwhile)."""
        self._tracker.fetched_global_progress_this_epoch.wait(timeout=10.0)
        if self._tracker.global_progress.epoch > self._tracker.local_progress.epoch:
            log.info("the run is at round %d: downloading its state from peers", self._tracker.global_epoch)
            started, waited = time.monotonic(), self.stats.wait_s
            self._start_catching_up(_cpu_copy(self._params), _cpu_copy(self._batchnorm), samples=0)
            while self._catching_up is not None:
                self._poll(in_round=0)
                time.sleep(0.05)
            self.stats.add_wait(time.monotonic() - started - (self.stats.wait_s - waited))  # all of it
            log.info("now at global step %d", self.global_step)

    def finish(self) -> None:
        """Land the round in flight, then average once more, plainly (no outer step: momentum would
        carry the model on past the end of the schedule), so that the peers end on one model. A last
        round that finds nobody is tried again: a partner may be held up (a round of its own that
        failed, a slow step), and without the last round the peers end on different models."""
        if self._scheduled is not None:  # its group may have formed: the others wait on this peer's part
            self._begin(self.num_peers)
        self._settle()
        for _ in range(FINAL_ATTEMPTS):
            if self._ended or self.num_peers <= 1:  # even with nothing to add: the others wait for it
                return
            self._begin(self.num_peers, final=True)
            self._settle()
        if not self._ended:
            log.warning(
                "the last round found no partner %d times: this peer ends on its own model", FINAL_ATTEMPTS
            )

    def _settle(self) -> None:
        """Wait for the round and the state download in flight, and land them."""
        if self._round is not None:
            self._wait_and_land()
        if self._catching_up is not None:
            with contextlib.suppress(Exception):  # a failed or endless download: told by the next call
                self._catching_up.download.result(timeout=LOAD_STATE_TIMEOUT_S)
            self._finish_catching_up()

    # ---- rounds ---------------------------------------------------------------------------------------

    def _window(self) -> float:
        """The matchmaking window of a round, from the mean time between recent rounds."""
        interval = sum(self._intervals) / len(self._intervals) if self._intervals else None
        return self._timing.matchmaking_s(interval, self._options.matchmaking_time)

    def _average(self, *, samples: int, weightless: bool, final: bool, ahead: float, timeout: float, **kw):
        """Start averaging in hivemind's averager, `ahead` seconds from now: gathered with this peer's
        state and `samples`, weighted by them. Returns its control and the (version, lineage, total) it
        was gathered with."""
        s = self.state
        control = self._averager.step(
            gather=dict(version=s.version, lineage=s.lineage, samples=samples, total=s.total, final=final),
            weight=0.0 if weightless else float(max(samples, 1)), scheduled_time=get_dht_time() + ahead,
            timeout=timeout, allow_retries=False, wait=False, **kw,
        )  # fmt: skip
        return control, (s.version, s.lineage, s.total)

    def _maybe_schedule(self) -> None:
        """Begin the next round's matchmaking when it is due within a window (the swarm's estimate of
        when the round's samples are in, hivemind's `estimated_next_update_time`, the same for all), as
        `hivemind.Optimizer` pre-schedules its rounds: its all-reduce can then start as soon as the round
        is due, instead of a matchmaking window later."""
        window = self._window()
        ahead = self._tracker.estimated_next_update_time - get_dht_time()
        if ahead > window:
            return
        ahead = max(0.0, ahead)
        weightless = self._catching_up is not None
        # gathered now, loaded later: the samples this peer will have by then (its measured pace)
        samples = (
            0 if weightless else round(self._since + self._tracker.performance_ema.samples_per_second * ahead)
        )
        timeout = ahead + self._timing.timeout_s(self._durations, window, self._options.averaging_timeout)
        control, base = self._average(
            samples=samples,
            weightless=weightless,
            final=False,
            ahead=ahead,
            timeout=timeout,
            require_trigger=True,
        )
        self._scheduled = _Scheduled(control, weightless, base, time.monotonic() + timeout)

    def _begin(self, peers: int, *, final: bool = False) -> None:
        """Start a round: snapshot the local state, load the pseudo-gradient, average in the background
        (in the group scheduled ahead, if it is still forming or formed)."""
        if self._round is not None:  # the last round is late: training waits for it
            self._wait_and_land()
        now = time.monotonic()
        if self._last_begin is not None:
            self._intervals = [*self._intervals[-4:], now - self._last_begin]
        self._last_begin = now
        with self._tracker.pause_updates():
            self._tracker.update_epoch(self._tracker.local_progress.epoch + 1)
        scheduled, self._scheduled = self._scheduled, None
        if scheduled is not None and (scheduled.control.done() or peers <= 1 or final):
            _cancel(scheduled.control)  # it found nobody, or nobody is left (the last round: its own)
            scheduled = None
        s = self.state
        weightless = scheduled.weightless if scheduled else self._catching_up is not None
        if weightless:  # this peer's state is not in the round: it moves by what the global state moves
            if peers <= 1:  # the run's state is being downloaded: nothing to step on alone
                return
            params, batchnorm = s.snapshot()
        else:
            params, batchnorm = _cpu_copy(self._params), _cpu_copy(self._batchnorm)
        if peers <= 1:  # nobody to average with: an outer step of its own, at once
            lineage = rounds.next_lineage(s.lineage, s.version, alone=self._peer_id)
            outcome = rounds.Outcome("apply-alone", s.version + 1, lineage, s.total + self._since)
            self._apply(outcome, params, batchnorm, self._since, averaged=False)
            return
        samples = 0 if weightless else self._since
        with torch.no_grad(), self._averager.get_tensors() as tensors:
            for tensor, g, x in zip(tensors, s.params, params):
                tensor.zero_() if weightless else torch.sub(g, x, out=tensor)
            for tensor, b in zip(tensors[len(params) :], batchnorm):
                tensor.copy_(b)
        if scheduled is not None:
            control, deadline, base = scheduled.control, scheduled.deadline, scheduled.base
            control.weight = 0.0 if weightless else float(max(samples, 1))
            control.allow_allreduce()
        else:
            matchmaking = self._window()
            if final:
                matchmaking = max(matchmaking, FINAL_MATCHMAKING_S)
            timeout = self._timing.timeout_s(self._durations, matchmaking, self._options.averaging_timeout)
            control, base = self._average(
                samples=samples, weightless=weightless, final=final, ahead=matchmaking, timeout=timeout
            )
            deadline = now + matchmaking + timeout
        self._round = _Round(control, params, batchnorm, samples, now, deadline, final, weightless, base)

    def _wait_and_land(self) -> None:
        """Wait for the round in flight, until its deadline. A group that does not form is given up by
        hivemind itself at the end of the round's window; it is not cancelled from here: a member that
        cancels just as its group forms leaves the others waiting on its part of the all-reduce."""
        started = time.monotonic()
        current = self._round
        while not current.control.done() and time.monotonic() < current.deadline:
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
        if gathered is None:
            self.stats.failed_rounds += 1
        else:
            self._durations = [*self._durations[-4:], time.monotonic() - current.started]
            self.stats.last_round_s = self._durations[-1]
        final = current.final or (gathered is not None and rounds.is_last_round(gathered))
        if current.weightless:
            self._land_weightless(current, gathered, final)
            return
        s = self.state
        outcome = rounds.after_round(
            version=s.version, lineage=s.lineage, total=s.total, samples=current.samples, gathered=gathered,
            peers=self.num_peers, peer_id=self._peer_id,
        )  # fmt: skip
        log.debug("round at version %d: %s, %d member(s)", s.version, outcome.action, outcome.members)
        if outcome.action == "skip" or (outcome.action == "apply-alone" and final):
            return  # contributes to the next round (or, at the end, keeps its own model)
        if outcome.action == "load":  # (a round begun while catching up is weightless: none is now)
            log.info("this peer missed a round: taking the run's state from peers")
            self._start_catching_up(current.params, current.batchnorm, samples=current.samples)
            self._record(outcome, final)
            return
        self._apply(
            outcome, current.params, current.batchnorm, current.samples, averaged=outcome.action == "apply",
            plain=final,
        )  # fmt: skip
        if final:
            self._end()

    def _land_weightless(self, current: _Round, gathered, final: bool) -> None:
        """A round taken part in without weight landed: its step is its members' in step. Record it
        while the download is in flight; once the download has landed, apply it if it follows the
        state held now (skip it if the download already holds it), else catch up again."""
        if gathered is None:
            return
        version, lineage, total = current.base
        outcome = rounds.after_round(
            version=version, lineage=lineage, total=total, samples=0, gathered=gathered, peers=self.num_peers,
            peer_id=self._peer_id,
        )  # fmt: skip
        log.debug(
            "weightless round from version %d: %s, %d member(s)", version, outcome.action, outcome.members
        )
        if outcome.action != "load":  # no member held a better state than the stale one: nothing to take
            return
        if self._catching_up is None:
            chain = rounds.replay(self.state.version, self.state.lineage, [outcome])
            if chain is None:
                log.info("this peer missed a round: taking the run's state from peers")
                self._start_catching_up(*self.state.snapshot(), samples=0)
            elif chain:
                self._apply(outcome, *self.state.snapshot(), 0, averaged=True, plain=final)
                if final:
                    self._end()
                return
            else:
                return  # the download already holds it
        self._record(outcome, final)

    @torch.no_grad()
    def _end(self) -> None:
        """A last round landed: the local model becomes the run's (the few steps this peer took while
        the round ran are dropped, so that every peer ends on the same model), and training stops."""
        for p, g in zip(self._params, self.state.params):
            p.copy_(g)
        for b, g in zip(self._batchnorm, self.state.batchnorm):
            b.copy_(g)
        self._since, self._ended = 0, True
        log.info(
            "the run's last round landed (%d peers): training ends on the averaged model", self.num_peers
        )

    def _apply(
        self, outcome, params, batchnorm, samples: int, *, averaged: bool, plain: bool = False
    ) -> None:
        """Fold the round into the global state (the averaged pseudo-gradient, or this peer's own), move
        the local state by what the global state moved, count the round's samples as averaged."""
        if averaged:
            deltas, batchnorm_now = self._averaged()
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

    def _start_catching_up(self, params, batchnorm, *, samples: int) -> None:
        """Begin downloading the run's state, and take part in rounds with no weight until it lands."""
        download = self._averager.load_state_from_peers(wait=False, timeout=self._options.averaging_timeout)
        self._catching_up = _CatchUp(download, params, batchnorm, samples, time.monotonic())
        self.stats.downloads += 1
        with self._tracker.pause_updates():  # take part in the run's next round, not in one of its own
            self._tracker.update_epoch(max(self._tracker.global_epoch, self._tracker.local_progress.epoch))

    def _averaged(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of what the last round averaged: the pseudo-gradient, then the BatchNorm statistics."""
        with self._averager.get_tensors() as tensors:
            n = len(self._params)
            return [t.clone() for t in tensors[:n]], [t.clone() for t in tensors[n:]]

    def _record(self, outcome: rounds.Outcome, plain: bool) -> None:
        """Keep a round's averaged step (what its members in step applied), to apply on the download."""
        step = (outcome, *self._averaged(), plain)
        self._catching_up.steps = [*self._catching_up.steps[-(MAX_RECORDED_ROUNDS - 1) :], step]

    def _finish_catching_up(self) -> None:
        """The download landed: take it, apply the recorded rounds that follow it, move the local state
        by what the global state moved; download again when they do not chain on from it."""
        catching_up, self._catching_up = self._catching_up, None
        try:
            loaded = catching_up.download.result(timeout=0)
        except Exception as e:  # timeout, cancelled, or no peer could send it
            log.debug("state download failed: %r", e)
            loaded = None
        if loaded is None:
            log.warning("could not download the run's state from any peer; training on")
            return
        if not self.state.adopt(*loaded):
            log.warning("a peer sent a state of the wrong shape; ignored")
            return
        chain = rounds.replay(self.state.version, self.state.lineage, [o for o, *_ in catching_up.steps])
        if chain is None:
            log.info("the state downloaded is of a round this peer did not record: downloading again")
            self._start_catching_up(catching_up.params, catching_up.batchnorm, samples=catching_up.samples)
            self._catching_up.steps = catching_up.steps
            return
        chosen, ended = {id(outcome) for outcome in chain}, False
        for outcome, deltas, batchnorm, plain in catching_up.steps:
            if id(outcome) in chosen:
                self.state.step(deltas, batchnorm, outcome, plain=plain)
                ended |= plain
        self._since -= catching_up.samples
        self._rebase(catching_up.params, catching_up.batchnorm)
        self._averager.state_sharing_priority = self.state.priority
        log.info(
            "took the run's state: round %d, %d round(s) that landed during the %.0f s download applied on it",
            self.state.version, len(chain), time.monotonic() - catching_up.started,
        )  # fmt: skip
        if ended:
            self._end()

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
        for pending in (self._round, self._scheduled):
            if pending is not None:
                _cancel(pending.control)
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
