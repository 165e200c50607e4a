"""The shapes world itself: sampling, validation, the scenes json."""

import json
import random
from collections import Counter

import pytest

from captioner.errors import UserError
from captioner.shapes.world import RADIUS, Obj, Scene, load_scenes, sample_scene


def scene(*objs: tuple[str, str, str, int, int]) -> Scene:
    """A scene from (color, shape, size, row, col) tuples, each object centred in its cell."""
    return Scene([Obj(c, s, z, r, k, (k + 0.5) / 3, (r + 0.5) / 3) for c, s, z, r, k in objs])


def test_scenes_round_trip_and_never_overlap():
    rng = random.Random(0)
    counts = Counter()
    for _ in range(300):
        sc = sample_scene(rng)
        counts[len(sc.objects)] += 1
        assert Scene.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
        # Each object's bounding circle stays inside its own grid cell, and cells are distinct.
        for o in sc.objects:
            r = RADIUS[o.size] / 3
            assert o.col / 3 < o.x - r and o.x + r < (o.col + 1) / 3
            assert o.row / 3 < o.y - r and o.y + r < (o.row + 1) / 3
    assert set(counts) == {1, 2, 3}


def test_bad_scene_dicts_are_rejected_with_the_offending_value():
    good = scene(("red", "circle", "small", 0, 0)).to_dict()
    bad_color = {"objects": [{**good["objects"][0], "color": "pink"}]}
    with pytest.raises(ValueError, match="pink"):
        Scene.from_dict(bad_color)
    with pytest.raises(ValueError, match="missing keys"):
        Scene.from_dict({"objects": [{"color": "red"}]})
    with pytest.raises(ValueError, match="overlap"):
        Scene.from_dict({"objects": good["objects"] * 2})


def test_load_scenes_reads_int_ids_and_names_the_file_on_errors(tmp_path):
    sc = scene(("red", "circle", "small", 0, 0), ("blue", "square", "large", 1, 2))
    path = tmp_path / "scenes_val.json"
    path.write_text(json.dumps({"7": sc.to_dict()}))
    assert load_scenes(path) == {7: sc}
    with pytest.raises(UserError, match=r"nowhere\.json.*captioner-prepare shapes"):
        load_scenes(tmp_path / "nowhere.json")
    path.write_text(json.dumps({"7": {"objects": []}}))
    with pytest.raises(ValueError, match=r"scenes_val\.json: image_id '7'"):
        load_scenes(path)
