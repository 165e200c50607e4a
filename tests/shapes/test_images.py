"""Rendering: each object's colour at its centre, the background elsewhere, sizes that differ."""

import random

import numpy as np

from captioner.shapes.images import BACKGROUND, RGB, render_scene
from captioner.shapes.world import SIZES, Obj, sample_scene
from tests.shapes.test_world import scene


def object_center_px(obj: Obj, image_size: int) -> tuple[int, int]:
    """The (x, y) pixel containing the object's centre in an `image_size` render."""
    return int(obj.x * image_size), int(obj.y * image_size)


def test_rendering_puts_each_colour_at_its_object_centre():
    rng = random.Random(3)
    for _ in range(100):
        sc = sample_scene(rng)
        pixels = np.asarray(render_scene(sc, 64))  # (H, W, 3)
        for o in sc.objects:
            x, y = object_center_px(o, 64)
            assert tuple(pixels[y, x]) == RGB[o.color], (o, pixels[y, x])
    assert tuple(pixels[0, 0]) == BACKGROUND or any(o.cell == (0, 0) for o in sc.objects)
    # Large objects cover clearly more pixels than small ones of the same shape.
    area = {}
    for size in SIZES:
        img = np.asarray(render_scene(scene(("red", "circle", size, 1, 1)), 64))
        area[size] = int((img != BACKGROUND).any(-1).sum())
    assert area["large"] > 2 * area["small"] > 0
