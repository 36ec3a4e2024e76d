"""Known datasets (the JSON definitions in the top-level manifests/ folder).

A definition gives a dataset's class count, images per split, layouts, and the defaults hivetrain trains
it with. `build` uses them to name what it built and to report missing images; nothing requires them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

DEFINITIONS_DIR = Path(__file__).resolve().parent.parent / "manifests"


@dataclass(frozen=True)
class DatasetDefinition:
    name: str
    description: str
    num_classes: int
    splits: dict[str, int]
    layouts: tuple[str, ...]
    image_size: int
    model: str
    classes: tuple[str, ...] = field(default=())


@functools.cache
def known_datasets() -> dict[str, DatasetDefinition]:
    """All definitions, by name."""
    out = {}
    for path in sorted(DEFINITIONS_DIR.glob("*.json")):
        d = json.loads(path.read_text())
        out[d["name"]] = DatasetDefinition(
            name=d["name"],
            description=d["description"],
            num_classes=d["num_classes"],
            splits=dict(d["splits"]),
            layouts=tuple(d["layouts"]),
            image_size=d["image_size"],
            model=d["model"],
            classes=tuple(d.get("classes", ())),
        )
    return out


def match(layout: str, num_classes: int) -> DatasetDefinition | None:
    """The known dataset that a build of `layout` with `num_classes` classes is, if any."""
    for definition in known_datasets().values():
        if layout in definition.layouts and definition.num_classes == num_classes:
            return definition
    return None
