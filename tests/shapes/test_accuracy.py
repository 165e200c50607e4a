"""Object accuracy: true captions score 1, captions with any object wrong score 0, and the config scorer."""

import json
import random
import re

import pytest
from hydra.utils import instantiate

from captioner.errors import UserError
from captioner.shapes.accuracy import ObjectAccuracy, caption_matches_scene, object_accuracy
from captioner.shapes.text import NUMBER_WORDS, STYLES, describe
from captioner.shapes.world import COLORS, sample_scene
from tests.shapes.test_world import scene


def test_every_caption_style_is_true_and_corruptions_score_zero():
    rng = random.Random(2)
    scenes, truths, swapped, recounted = {}, {}, {}, {}
    for image_id in range(300):
        sc = sample_scene(rng)
        absent = next(c for c in COLORS if c not in {o.color for o in sc.objects})
        for k, style in enumerate(STYLES):
            key = image_id * 10 + k
            scenes[key] = sc
            truths[key] = describe(sc, rng, style)
            swapped[key] = truths[key].replace(sc.objects[0].color, absent, 1)
            if style == "count":
                n = len(sc.objects)
                recounted[key] = truths[key].replace(f"{NUMBER_WORDS[n]} ", f"{NUMBER_WORDS[n + 1]} ", 1)
    assert object_accuracy(truths, scenes) == 1.0
    assert object_accuracy(swapped, scenes) == 0.0
    assert object_accuracy(recounted, scenes) == 0.0


@pytest.mark.parametrize(
    ("caption", "ok"),
    [
        ("a red circle and a blue square.", True),
        ("a blue square to the left of a red circle.", True),
        ("there are two objects: a big red circle and a small blue square.", True),
        ("an orange star, a red circle and a blue square.", False),  # extra object
        ("a red circle.", False),  # dropped object
        ("a green circle and a blue square.", False),  # wrong colour
        ("a red triangle and a blue square.", False),  # wrong shape
        ("two red circles and a blue square.", False),  # wrong count
        ("there are three objects: a red circle and a blue square.", False),  # wrong total
        ("red circles and a blue square.", False),  # count not said
        ("a circle and a blue square.", False),  # colour not said
        ("a red circle and a blue square. the green square is big.", False),  # reference to nothing mentioned
        ("a red circle and a blue square. the square is on the right.", True),
    ],
)
def test_caption_parser_on_handwritten_captions(caption, ok):
    sc = scene(("red", "circle", "small", 0, 0), ("blue", "square", "large", 1, 2))
    assert caption_matches_scene(caption, sc) is ok
    assert object_accuracy({7: caption}, {"7": sc.to_dict()}) == float(ok)


def test_counts_in_words_and_digits():
    sc = scene(
        ("red", "circle", "small", 0, 0), ("red", "circle", "large", 1, 2), ("yellow", "star", "small", 2, 2)
    )
    for caption in (
        "two red circles and a yellow star.",
        "2 red circles and one yellow star.",
        "three shapes: a yellow star and two red circles.",
    ):
        assert caption_matches_scene(caption, sc), caption
    assert not caption_matches_scene("three red circles and a yellow star.", sc)
    with pytest.raises(UserError, match="no scene for image_id 5"):
        object_accuracy({5: "a red circle."}, {})


def test_object_accuracy_scorer_from_config(tmp_path):
    scenes = {
        1: scene(("red", "circle", "small", 0, 0), ("blue", "square", "large", 1, 2)),
        2: scene(("green", "star", "large", 2, 1)),
    }
    path = tmp_path / "annotations" / "scenes_val.json"
    # Built before the file exists, as training builds it from config before the data may be prepared.
    scorer = instantiate({"_target_": "captioner.shapes.accuracy.ObjectAccuracy", "scenes": str(path)})
    assert isinstance(scorer, ObjectAccuracy)
    path.parent.mkdir()
    path.write_text(json.dumps({str(i): s.to_dict() for i, s in scenes.items()}))

    refs = {1: ["a red circle and a blue square."], 2: ["a green star."]}
    overall, per_image = scorer({1: "a blue square and a red circle.", 2: "a big green star."}, refs)
    assert overall == {"object_acc": 1.0}
    assert per_image == {1: {"object_acc": 1.0}, 2: {"object_acc": 1.0}}
    path.unlink()  # read once, then kept
    overall, per_image = scorer({1: "a red circle.", 2: "a large green star."}, refs)
    assert overall == {"object_acc": 0.5}
    assert per_image == {1: {"object_acc": 0.0}, 2: {"object_acc": 1.0}}
    with pytest.raises(UserError, match=r"scenes_val\.json: no scene for image_id 3"):
        scorer({3: "a red circle."}, {3: ["a red circle."]})


def test_object_accuracy_scorer_without_scenes_says_how_to_make_them(tmp_path):
    path = tmp_path / "scenes_val.json"
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}.*captioner-prepare shapes"):
        ObjectAccuracy(str(path))({1: "a red circle."}, {1: ["a red circle."]})
