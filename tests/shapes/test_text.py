"""The world's English: documents and questions say only true things, in the world's vocabulary."""

import random
from collections import Counter

from captioner.shapes.accuracy import caption_matches_scene
from captioner.shapes.text import NUMBER_WORDS, QUESTION_KINDS, document, facts, hellaswag_rows, split_words
from captioner.shapes.world import COLORS, SHAPES, Scene, sample_scene
from tests.shapes.claims import claim_holds

# Every word the world's English may use; a template that drifts outside it fails the corpus test.
WORLD_WORDS = (
    set(COLORS)
    | set(SHAPES)
    | {s + "s" for s in SHAPES}
    | {"small", "little", "large", "big"}
    | set(NUMBER_WORDS[1:6])
    | {"a", "an", "the", "and", "of", "to", "is", "are", "there", "in", "at", "on", "with"}
    | {"image", "picture", "dark", "background", "number", "object", "objects", "shape", "shapes"}
    | {"left", "right", "top", "bottom", "center", "corner", "above", "below"}
)


def test_documents_only_say_true_things():
    rng = random.Random(1)
    for _ in range(300):
        sc = sample_scene(rng)
        intro, *claims = document(sc, rng).split(". ")
        assert caption_matches_scene(intro, sc), intro
        assert claims and all(claim_holds(sc, c) for c in claims), claims
        assert all(claim_holds(sc, f) for f in facts(sc, sizes=True, positions=True))


def test_hellaswag_rows_have_exactly_one_true_ending():
    rows = hellaswag_rows(random.Random(0), 40)
    kinds, labels = Counter(), Counter()
    for i, row in enumerate(rows):
        assert row["ind"] == i and row["split"] == "val" and row["source_id"] == "shapes"
        assert row["ctx"] == f"{row['ctx_a']} {row['ctx_b']}"
        assert len(row["endings"]) == 4 and len(set(row["endings"])) == 4
        assert all(not e.startswith(" ") and set(split_words(e)) <= WORLD_WORDS for e in row["endings"])
        sc = Scene.from_dict(row["scene"])
        # The context mentions every object truly, and the scene makes exactly the labelled ending true.
        assert caption_matches_scene(row["ctx_a"], sc), row["ctx_a"]
        truth = [claim_holds(sc, f"{row['ctx_b']} {e}") for e in row["endings"]]
        assert truth.count(True) == 1 and truth[row["label"]], row
        kinds[row["activity_label"]] += 1
        labels[row["label"]] += 1
    assert len(kinds) == len(QUESTION_KINDS) and len(labels) > 1
