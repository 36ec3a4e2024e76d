"""`hivetrain run` whose chosen local steps get a poisoned batch: every pixel NaN.

    HIVETRAIN_POISON_STEPS=2,3,5 HIVETRAIN_START_FILE=F python -m tests.faults.poisoned_peer run ...

(any `run` flags; before its first step the peer waits, up to 2 minutes, until the file F exists)

Only the batch is replaced, as it enters `Peer._step`; the detection, the skip and everything around
them (the hivemind optimizer, averaging with the other real peers, checkpoints) are the product's own.
"""

from __future__ import annotations

import os
import time

import torch

from hivetrain.cli import cli
from hivetrain.train import Peer

START_FILE = os.environ.get("HIVETRAIN_START_FILE")
POISON = {int(x) for x in os.environ.get("HIVETRAIN_POISON_STEPS", "").split(",") if x}
_step = Peer._step
_count = 0


def _poisoned_step(self: Peer, images: torch.Tensor, labels: torch.Tensor) -> float:
    global _count
    _count += 1
    if _count == 1 and START_FILE:  # poison a run of several peers: wait until the test says they are there
        deadline = time.monotonic() + 120
        while not os.path.exists(START_FILE) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"training with {self.sync.num_peers} peer(s) known", flush=True)
    if _count in POISON:
        print(f"poisoning local step {_count}", flush=True)
        images = torch.full(images.shape, float("nan"), dtype=torch.float32, device=images.device)
    return _step(self, images, labels)


Peer._step = _poisoned_step

if __name__ == "__main__":
    cli(prog_name="hivetrain")
