"""The shapes world itself: seeded scenes of 1-3 coloured shapes, one per cell of a 3x3 grid (so they never
overlap); relations (left of, right of, above, below) follow from the cells. Its English is in `text`, its
look in `images`; `captioner.prepare.shapes` writes it out.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from captioner.errors import UserError

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")
GRID = 3
# Object radius as a fraction of a grid cell's side. Large objects nearly fill their cell; the margin keeps
# neighbours apart even after the jitter, so objects never touch.
RADIUS = {"small": 0.27, "large": 0.44}
MARGIN = 0.04
# Each cell's name and each relation's, in the words every caption, fact and question uses for them.
POSITIONS = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
RELATIONS = ("to the left of", "to the right of", "above", "below")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int  # grid cell, 0 = top
    col: int  # grid cell, 0 = left
    x: float  # centre, as a fraction of the image width (0 = left edge)
    y: float  # centre, as a fraction of the image height (0 = top edge)

    def __post_init__(self):
        for name, allowed in (("color", COLORS), ("shape", SHAPES), ("size", SIZES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"object {name} {getattr(self, name)!r} is not one of {allowed}")
        for name in ("row", "col"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < GRID:
                raise UserError(f"object {name} {value!r} is not a grid index in 0..{GRID - 1}")
        for name in ("x", "y"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"object {name} {getattr(self, name)!r} is outside [0, 1]")

    @property
    def cell(self) -> tuple[int, int]:
        return self.row, self.col


@dataclass(frozen=True)
class Scene:
    objects: list[Obj]

    def __post_init__(self):
        if not self.objects:
            raise UserError("a scene needs at least one object")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise UserError(f"objects share a grid cell (they would overlap): cells {cells}")

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        if not isinstance(d, dict) or not isinstance(d.get("objects"), list):
            raise UserError(f"scene must be a dict with an 'objects' list, got {d!r}")
        fields = ("color", "shape", "size", "row", "col", "x", "y")
        objects = []
        for i, o in enumerate(d["objects"]):
            missing = [f for f in fields if f not in o]
            if missing:
                raise UserError(f"scene object {i} is missing keys {missing}: {o!r}")
            objects.append(Obj(**{f: o[f] for f in fields}))
        return cls(objects)


def relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    """Whether `a <relation> b`, judged by grid cells (y grows downwards)."""
    if relation == "to the left of":
        return a.col < b.col
    if relation == "to the right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise UserError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def sample_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    """A random scene: 1..max_objects objects in distinct grid cells, jittered inside their cell.

    `rng` is a `random.Random` (fast scalar draws, and stable across Python versions for a given seed).
    Objects are listed in reading order (top-left first).
    """
    n = rng.randint(1, max_objects)
    objects = []
    for cell in sorted(rng.sample(range(GRID * GRID), n)):
        row, col = divmod(cell, GRID)
        color, shape, size = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(SIZES)
        slack = 0.5 - RADIUS[size] - MARGIN  # how far the centre may move without leaving the cell
        x = (col + 0.5 + rng.uniform(-slack, slack)) / GRID
        y = (row + 0.5 + rng.uniform(-slack, slack)) / GRID
        objects.append(Obj(color, shape, size, row, col, round(x, 4), round(y, 4)))
    return Scene(objects)


def load_scenes(path: str | Path) -> dict[int, Scene]:
    """Read a scenes_{split}.json (written by `captioner-prepare shapes`) into {image_id: Scene}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"scenes file not found: {path} (run `captioner-prepare shapes`)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected an object {{image_id: scene}}, got {type(raw).__name__}")
    scenes = {}
    for key, value in raw.items():
        try:
            scenes[int(key)] = Scene.from_dict(value)
        except ValueError as err:
            raise UserError(f"{path}: image_id {key!r}: {err}") from None
    return scenes
