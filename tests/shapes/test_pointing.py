"""Pointing accuracy: a noun's map is a hit only on the cells of the objects its phrase names (shape, colour,
size), chance is those cells' share of the grid, nouns that name nothing are not scored, and the config scorer."""

import json

import numpy as np
import pytest
from hydra.utils import instantiate

from captioner.errors import UserError
from captioner.models.attention_maps import AttentionMaps
from captioner.shapes.pointing import patch_cells, pointing_accuracy, words_with_tokens
from captioner.tokenizer import gpt2_encoding
from tests.shapes.test_world import scene


def maps_looking_at(caption: str, looks: dict[str, tuple[int, int]], side: int = 3) -> AttentionMaps:
    """Maps of `caption` whose tokens each peak on a patch: looks {token text: (row, col)}, uniform elsewhere."""
    encoding = gpt2_encoding()
    tokens = [encoding.decode([t]) for t in encoding.encode(caption)]
    patches = np.full((len(tokens), side, side), 1 / side**2, dtype=np.float32)
    for t, token in enumerate(tokens):
        if token.strip() in looks:
            patches[t] = 0.02 / (side * side - 1)
            patches[t][looks[token.strip()]] = 0.98
    return AttentionMaps(tokens, patches, np.zeros(len(tokens), dtype=np.float32))


TWO = scene(("red", "circle", "small", 0, 0), ("blue", "square", "large", 2, 2))


def test_words_are_found_in_the_token_they_start_in():
    tokens = ["a", " red", " circ", "le", " and", " two", " Blue", " squares", "."]
    assert words_with_tokens(tokens) == [
        ("a", 0),
        ("red", 1),
        ("circle", 2),
        ("and", 4),
        ("two", 5),
        ("blue", 6),
        ("squares", 7),
    ]


def test_a_map_that_peaks_on_the_named_object_is_a_hit_and_elsewhere_a_miss():
    right = maps_looking_at("a red circle and a blue square.", {"circle": (0, 0), "square": (2, 2)})
    swapped = maps_looking_at("a red circle and a blue square.", {"circle": (2, 2), "square": (0, 0)})
    overall, per_image = pointing_accuracy({1: right, 2: swapped}, {1: TWO, 2: TWO})
    assert overall == {"pointing_acc": 0.5, "pointing_chance": pytest.approx(1 / 9)}
    assert per_image == {1: {"pointing_acc": 1.0}, 2: {"pointing_acc": 0.0}}


def test_the_noun_phrase_binds_colour_and_size():
    twins = scene(
        ("red", "circle", "small", 0, 0), ("red", "circle", "large", 1, 1), ("green", "star", "small", 0, 2)
    )
    on_large = {"circle": (1, 1)}
    assert (
        pointing_accuracy({1: maps_looking_at("a small red circle.", on_large)}, {1: twins})[0][
            "pointing_acc"
        ]
        == 0
    )
    assert (
        pointing_accuracy({1: maps_looking_at("a big red circle.", on_large)}, {1: twins})[0]["pointing_acc"]
        == 1
    )
    # without a size the phrase names both circles: either cell is a hit, and chance doubles
    scores, _ = pointing_accuracy({1: maps_looking_at("two red circles.", {"circles": (0, 0)})}, {1: twins})
    assert scores == {"pointing_acc": 1.0, "pointing_chance": pytest.approx(2 / 9)}


def test_nouns_that_name_nothing_in_the_scene_are_not_scored():
    wrong = maps_looking_at("a green circle and a blue star.", {"circle": (0, 0), "star": (2, 2)})
    two_colours = maps_looking_at("a red blue circle.", {"circle": (0, 0)})
    overall, per_image = pointing_accuracy({1: wrong, 2: two_colours}, {1: TWO, 2: TWO})
    assert overall == {"pointing_acc": None, "pointing_chance": None} and per_image == {}
    partly = maps_looking_at("a green circle and a blue square.", {"circle": (2, 2), "square": (2, 2)})
    assert pointing_accuracy({1: partly}, {1: TWO})[0]["pointing_acc"] == 1.0  # only the square is scored


def test_a_finer_patch_grid_is_read_through_the_cells_under_its_patches():
    assert (patch_cells(3, 3) == np.arange(9).reshape(3, 3)).all()
    cells = patch_cells(7, 7)  # ViT-B/32 at 224 px: rows 0-1, 2-4, 5-6 fall in world rows 0, 1, 2
    assert cells[1, 1] == 0 and cells[2, 2] == 4 and cells[4, 5] == 5 and cells[6, 6] == 8
    corner = maps_looking_at("a red circle.", {"circle": (1, 0)}, side=7)
    assert pointing_accuracy({1: corner}, {1: TWO})[0] == {"pointing_acc": 1.0, "pointing_chance": 4 / 49}


def test_the_config_scorer_reads_the_scenes_file_and_asks_for_maps(tmp_path):
    path = tmp_path / "scenes_val.json"
    path.write_text(json.dumps({"7": TWO.to_dict()}))
    scorer = instantiate({"_target_": "captioner.shapes.pointing.PointingAccuracy", "scenes": str(path)})
    assert scorer.needs_attention
    maps = maps_looking_at("a red circle and a blue square.", {"circle": (0, 0), "square": (1, 1)})
    overall, per_image = scorer({7: "a red circle and a blue square."}, {7: []}, attention={7: maps})
    assert overall["pointing_acc"] == 0.5 and per_image == {7: {"pointing_acc": 0.5}}
    with pytest.raises(UserError, match="no scene for image_id 8"):
        scorer({8: "a red circle."}, {8: []}, attention={8: maps})
