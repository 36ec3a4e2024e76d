"""How the peers of a run combine their work: one strategy per module, chosen by `--sync`.

    base.py        SyncContext (what a strategy is given), the Synchronizer protocol, codecs, counters
    every_step.py  `every-step`: hivemind.Optimizer, gradients averaged at every global step
    diloco.py      `diloco`: local steps, then an averaged pseudo-gradient and an outer Nesterov step,
                   averaged in the background while training goes on
    rounds.py      the pure decisions of a DiLoCo round (who applies, who reloads, timings)

`make(context)` builds the strategy `context.options.sync` names.
"""

from __future__ import annotations

from ..options import SYNC_MODES
from .base import SyncContext, Synchronizer, SyncStats


def make(context: SyncContext) -> Synchronizer:
    """The synchronisation strategy that `context.options.sync` names, ready to train."""
    mode = context.options.sync
    if mode == "every-step":
        from .every_step import EveryStep

        return EveryStep(context)
    if mode == "diloco":
        from .diloco import DiLoCo

        return DiLoCo(context)
    raise ValueError(f"unknown --sync mode {mode!r}; choose one of {', '.join(SYNC_MODES)}")


__all__ = ["SyncContext", "SyncStats", "Synchronizer", "make"]
