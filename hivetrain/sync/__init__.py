"""How the peers of a run combine their work: one strategy per module, chosen by `--sync`.

    base.py        SyncContext (what a strategy is given), the Synchronizer protocol, codecs, counters
    every_step.py  `every-step`: hivemind.Optimizer, gradients averaged at every global step

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
    raise ValueError(f"unknown --sync mode {mode!r}; choose one of {', '.join(SYNC_MODES)}")


__all__ = ["SyncContext", "SyncStats", "Synchronizer", "make"]
