"""Checkpoints: `latest` and `best`, written atomically, refused when they belong to another run.

A checkpoint holds the model, the hivemind optimizer state (with its global step), the scheduler, the
best validation accuracy, the run's data position (its data epoch and the shards of the open epochs
already done, by name), and the identity of what was trained: dataset name, manifest fingerprint
(hash of the shard contents), model name and class count. Loading one for a different dataset or
model is a one-line CheckpointError, never a half-loaded model. Writes go to a temp file and are
renamed into place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardtool.fsutil import atomic_output

from .errors import CheckpointError
from .leases import Position

FORMAT = "hivetrain-checkpoint"
VERSION = 1
LATEST, BEST = "latest.pt", "best.pt"


@dataclass(frozen=True)
class Identity:
    """What a checkpoint was trained on; all fields must match to resume."""

    dataset: str
    fingerprint: str
    model: str
    num_classes: int
    image_size: int


def save(path: str | os.PathLike, *, identity: Identity, state: dict[str, Any]) -> None:
    """Write `state` (model, optimizer, scheduler, epoch, best accuracy, ...) atomically to `path`."""
    payload = {"format": FORMAT, "version": VERSION, "identity": identity.__dict__, **state}
    with atomic_output(path) as f:
        torch.save(payload, f)


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete the temp files of saves that a kill -9 or a power cut interrupted (each is a whole
    model's worth of disk); returns their names. Call it before this process saves to `folder`."""
    removed = []
    for name in (LATEST, BEST):
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp.name)
    return removed


def load(path: str | os.PathLike, *, expect: Identity | None = None) -> dict[str, Any]:
    """Read a checkpoint (a file, or a folder holding latest.pt) and check it belongs to `expect`.

    Raises:
        CheckpointError: missing, unreadable, not a hivetrain checkpoint, or another dataset/model.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike for damaged files
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a hivetrain checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r} is not supported")
    if expect is not None:
        saved = payload.get("identity", {})
        for field, wanted in expect.__dict__.items():
            if saved.get(field) != wanted:
                raise CheckpointError(
                    f"{path}: checkpoint is for {field} {saved.get(field)!r}, this run has {wanted!r} "
                    f"(dataset {saved.get('dataset')!r}, model {saved.get('model')!r}); "
                    "start a new --checkpoint-dir or resume with the matching --shards/--model"
                )
    return payload


def position_state(position: Position, shards: Sequence[str]) -> dict[str, Any]:
    """`position` as a checkpoint keeps it: shard names, not indices, so that it reads on its own."""
    done = {str(e): [shards[i] for i in sorted(indices)] for e, indices in sorted(position.done.items())}
    return {"epoch": position.epoch, "done": done}


def saved_position(payload: dict[str, Any], shards: Sequence[str], *, path: str | os.PathLike) -> Position:
    """The data position a loaded checkpoint recorded (epoch 0, nothing done, for one that has none;
    only the data epoch for one written before positions were)."""
    saved = payload.get("data_position")
    if saved is None:
        return Position(int(payload.get("data_epoch", 0) or 0), {})
    index = {name: i for i, name in enumerate(shards)}
    try:
        epoch, done = saved["epoch"], saved["done"]
        position = Position(
            int(epoch), {int(e): frozenset(index[name] for name in names) for e, names in done.items()}
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: its data position is damaged ({type(e).__name__}: {e})") from None
    if position.epoch < 0 or any(e < position.epoch for e in position.done):
        raise CheckpointError(
            f"{path}: its data position is damaged (epoch {position.epoch}, done {sorted(position.done)})"
        )
    return position


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Initial weights from a local file: a hivetrain checkpoint or a plain state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds no state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model ({first})") from None
