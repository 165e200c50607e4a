"""Pointing accuracy: when a caption names an object of the scene, does its attention map peak on that object?

A grounding score no public captioner can report, since only a synthetic world knows where each object is. For
every shape noun of a generated caption ("circle", "squares") that names objects of the scene, bound by the
colour and size words before it as object accuracy reads them ("a small red circle"), the noun's map
(`captioner.models.attention_maps`: the attention of the step that emitted it) is a hit when its peak patch lies
in a cell of one of those objects. Nouns that name nothing in the scene (a wrong colour, a hallucinated shape)
are not scored: object accuracy already counts them. Chance is what a peak drawn uniformly over the patches
would score: the named objects' share of the grid (1/9 for one object on the 3x3 grid).

`PointingAccuracy` is the scorer training instantiates from config; it declares `needs_attention`, so the
caption module computes maps (only then) and passes them in.
"""

from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

import numpy as np

from captioner.errors import UserError
from captioner.models.attention_maps import AttentionMaps
from captioner.shapes.accuracy import _SHAPE_NOUNS, _noun_phrase_before
from captioner.shapes.text import split_words
from captioner.shapes.world import COLORS, GRID, Obj, Scene, load_scenes


def words_with_tokens(tokens: list[str]) -> list[tuple[str, int]]:
    """(word, index of the token it starts in) for each word of the caption `tokens` spell, words as
    `split_words` finds them."""
    lowered = [token.lower() for token in tokens]
    starts = np.cumsum([0] + [len(token) for token in lowered[:-1]]).tolist()  # each token's first character
    text, position, found = "".join(lowered), 0, []
    for word in split_words(text):
        at = text.index(word, position)
        position = at + len(word)
        found.append((word, bisect_right(starts, at) - 1))
    return found


def named_objects(words: list[str], i: int, scene: Scene) -> list[Obj]:
    """The scene's objects the shape noun words[i] names: its shape, and the colour and size said before it."""
    shape, _ = _SHAPE_NOUNS[words[i]]
    color, sizes, _ = _noun_phrase_before(words, i)
    if color is not None and color not in COLORS:  # two colours: names nothing
        return []
    return [
        o
        for o in scene.objects
        if o.shape == shape and color in (None, o.color) and (not sizes or o.size in sizes)
    ]


def patch_cells(height: int, width: int) -> np.ndarray:
    """(H, W) int: the world cell (row * GRID + col) under each patch's centre, for any patch grid."""
    rows = ((np.arange(height) + 0.5) * GRID / height).astype(int)  # (H,)
    cols = ((np.arange(width) + 0.5) * GRID / width).astype(int)  # (W,)
    return rows[:, None] * GRID + cols[None, :]  # (H, W)


def point_mentions(maps: AttentionMaps, scene: Scene) -> list[tuple[bool, float]]:
    """(hit, chance) for each shape noun of the caption that names objects of `scene`."""
    cells = patch_cells(*maps.patches.shape[1:])  # (H, W)
    located = words_with_tokens(maps.tokens)
    words = [word for word, _ in located]
    results = []
    for i, (word, token) in enumerate(located):
        if word not in _SHAPE_NOUNS:
            continue
        named = {o.row * GRID + o.col for o in named_objects(words, i, scene)}
        if not named:
            continue
        inside = np.isin(cells, list(named))  # (H, W)
        peak = np.unravel_index(np.argmax(maps.patches[token]), cells.shape)
        results.append((bool(inside[peak]), float(inside.mean())))
    return results


def pointing_accuracy(
    maps: dict[int, AttentionMaps], scenes: dict[int, Scene]
) -> tuple[dict[str, float | None], dict[int, dict[str, float]]]:
    """({"pointing_acc", "pointing_chance"} over every scored noun, None when there is none; per image
    {"pointing_acc"} for the images with a scored noun) for maps {image_id: AttentionMaps}."""
    overall, per_image = [], {}
    for image_id, image_maps in maps.items():
        mentions = point_mentions(image_maps, scenes[image_id])
        if mentions:
            per_image[image_id] = {"pointing_acc": float(np.mean([hit for hit, _ in mentions]))}
        overall += mentions
    if not overall:
        return {"pointing_acc": None, "pointing_chance": None}, per_image
    hits, chances = zip(*overall)
    return {"pointing_acc": float(np.mean(hits)), "pointing_chance": float(np.mean(chances))}, per_image


class PointingAccuracy:
    """Caption scorer for the shapes world: does each named object's attention map peak on it?

    scenes: a `scenes_<split>.json` written by `captioner-prepare shapes`, read on the first call (as
    ObjectAccuracy does). needs_attention: the caller passes `attention` {image_id: AttentionMaps} of the
    generated captions (`captioner.models.attention_maps.attention_maps`).
    """

    needs_attention = True

    def __init__(self, scenes: str | Path):
        self.scenes = Path(scenes)
        self._loaded: dict[int, Scene] | None = None

    def __call__(
        self,
        predictions: dict[int, str],
        references: dict[int, list[str]],
        attention: dict[int, AttentionMaps],
    ) -> tuple[dict[str, float | None], dict[int, dict[str, float]]]:
        """`pointing_accuracy` of the predicted images' maps. The maps carry their captions' tokens, so
        `predictions` only says which images to score; `references` is unused, as for ObjectAccuracy."""
        if self._loaded is None:
            self._loaded = load_scenes(self.scenes)
        if missing := [image_id for image_id in predictions if image_id not in self._loaded]:
            raise UserError(f"{self.scenes}: no scene for image_id {missing[0]!r}")
        return pointing_accuracy({image_id: attention[image_id] for image_id in predictions}, self._loaded)
