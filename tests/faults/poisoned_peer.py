"""`hivetrain run` whose chosen local steps get a poisoned batch: every pixel NaN.

    HIVETRAIN_POISON_STEPS=2,3,5 python -m tests.faults.poisoned_peer run --shards ... (any `run` flags)

Only the batch is replaced, as it enters `Peer._step`; the detection, the skip and everything around
them (the hivemind optimizer, averaging with the other real peers, checkpoints) are the product's own.
"""

from __future__ import annotations

import os

import torch

from hivetrain.cli import cli
from hivetrain.train import Peer

POISON = {int(x) for x in os.environ.get("HIVETRAIN_POISON_STEPS", "").split(",") if x}
_step = Peer._step
_count = 0


def _poisoned_step(self: Peer, images: torch.Tensor, labels: torch.Tensor) -> float:
    global _count
    _count += 1
    if _count in POISON:
        print(f"poisoning local step {_count}", flush=True)
        images = torch.full(images.shape, float("nan"), dtype=torch.float32, device=images.device)
    return _step(self, images, labels)


Peer._step = _poisoned_step

if __name__ == "__main__":
    cli(prog_name="hivetrain")
