"""How the world looks: a scene rendered as an RGB image, objects flat-coloured on a dark background."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from captioner.errors import UserError
from captioner.shapes.world import GRID, RADIUS, SHAPES, Scene

RGB = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 220),
    "orange": (250, 140, 20),
}
BACKGROUND = (28, 28, 32)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape of radius r centred at (cx, cy), in pixels (y down)."""
    if shape == "square":
        h = 0.82 * r  # about a circle's area
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":  # taller than wide, so it never reads as a rotated square
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "triangle":  # pointing up; centred on its bounding box rather than its centroid
        R = 1.15 * r
        return [
            (cx + R * math.cos(a), cy + 0.25 * R + R * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":  # five points, outer radius r, inner 0.48 r
        return [
            (cx + rr * math.cos(a), cy + rr * math.sin(a))
            for k in range(10)
            for rr, a in [((r if k % 2 == 0 else 0.48 * r), -math.pi / 2 + k * math.pi / 5)]
        ]
    raise UserError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """RGB image of `scene`: drawn at `supersample`x then box-downsampled, which antialiases the edges while
    interior pixels keep the exact colour."""
    big = image_size * supersample
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, r = obj.x * big, obj.y * big, RADIUS[obj.size] * big / GRID
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=RGB[obj.color])
        else:
            draw.polygon(_outline(obj.shape, cx, cy, r), fill=RGB[obj.color])
    return img.resize((image_size, image_size), Image.Resampling.BOX)
