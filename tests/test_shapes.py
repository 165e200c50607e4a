"""The shapes world: determinism, production formats, caption/claim checking, rendering, idempotence."""

import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data import shapes as S
from captioner.data.hellaswag import load_examples
from captioner.data.shapes import Obj, Scene
from captioner.tokenizer import EOT, gpt2_encoding

TINY = dict(
    train_tokens=20_000, val_tokens=5_000, n_train_images=8, n_val_images=4, n_hellaswag=40, shard_size=8_000
)
# Every word the world's English may use; a template that drifts outside it fails the corpus test.
WORLD_WORDS = (
    set(S.COLORS)
    | set(S.SHAPES)
    | {s + "s" for s in S.SHAPES}
    | {"small", "little", "large", "big"}
    | set(S.NUMBER_WORDS[1:6])
    | {"a", "an", "the", "and", "of", "to", "is", "are", "there", "in", "at", "on", "with"}
    | {"image", "picture", "dark", "background", "number", "object", "objects", "shape", "shapes"}
    | {"left", "right", "top", "bottom", "center", "corner", "above", "below"}
)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text)


def scene(*objs: tuple[str, str, str, int, int]) -> Scene:
    """A scene from (color, shape, size, row, col) tuples, each object centred in its cell."""
    return Scene([Obj(c, s, z, r, k, (k + 0.5) / 3, (r + 0.5) / 3) for c, s, z, r, k in objs])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "world"
    S.prepare_shapes(out, seed=0, **TINY)
    return out


def test_scenes_round_trip_and_never_overlap():
    rng = random.Random(0)
    counts = Counter()
    for _ in range(300):
        sc = S.sample_scene(rng)
        counts[len(sc.objects)] += 1
        assert Scene.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
        # Each object's bounding circle stays inside its own grid cell, and cells are distinct.
        for o in sc.objects:
            r = S.RADIUS[o.size] / 3
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


def test_same_seed_same_bytes_other_seed_other_bytes(world, tmp_path):
    S.prepare_shapes(tmp_path / "same", seed=0, **TINY)
    S.prepare_shapes(tmp_path / "other", seed=1, **TINY)
    ref, same, other = files(world), files(tmp_path / "same"), files(tmp_path / "other")
    assert same == ref
    assert set(other) == set(ref)
    for name in (
        "text/shapes_val_000000.npy",
        "text/shapes_train_000001.npy",
        "hellaswag/shapes_val.jsonl",
        "images/annotations/captions_train.json",
        "images/val/00000009.png",
    ):
        assert other[name] != ref[name], name


def test_token_shards_hold_eot_prefixed_world_english(world):
    text = world / "text"
    names = sorted(p.name for p in text.iterdir())
    assert names == [
        "shapes_train_000001.npy",
        "shapes_train_000002.npy",
        "shapes_train_000003.npy",
        "shapes_val_000000.npy",
    ]
    shards = {name: np.load(text / name) for name in names}
    assert all(t.dtype == np.uint16 for t in shards.values())
    assert len(shards["shapes_val_000000.npy"]) == TINY["val_tokens"]
    assert [len(shards[n]) for n in names[:3]] == [8_000, 8_000, 4_000]
    enc = gpt2_encoding()
    for tokens in (shards["shapes_val_000000.npy"], np.concatenate([shards[n] for n in names[:3]])):
        assert tokens[0] == EOT
        docs = enc.decode(tokens.tolist()).split("<|endoftext|>")[1:-1]  # the last one is cut off
        assert len(docs) > 50
        for doc in docs:
            assert set(words(doc)) <= WORLD_WORDS, doc
            shapes = {w.removesuffix("s") for w in words(doc)} & set(S.SHAPES)
            assert set(words(doc)) & set(S.COLORS) and shapes, doc


def test_documents_only_say_true_things():
    rng = random.Random(1)
    for _ in range(300):
        sc = S.sample_scene(rng)
        intro, *claims = S.document(sc, rng).split(". ")
        assert S.caption_matches_scene(intro, sc), intro
        assert claims and all(S.claim_holds(sc, c) for c in claims), claims
        assert all(S.claim_holds(sc, f) for f in S.facts(sc, sizes=True, positions=True))


def test_claims_are_checked_not_assumed():
    sc = scene(
        ("red", "circle", "small", 0, 0), ("blue", "square", "large", 0, 2), ("blue", "circle", "large", 2, 0)
    )
    assert S.claim_holds(sc, "the square is blue.")
    assert not S.claim_holds(sc, "the square is red.")
    assert S.claim_holds(sc, "the red circle is to the left of the square.")
    assert not S.claim_holds(sc, "the red circle is below the square.")
    assert S.claim_holds(sc, "the small circle is above the large circle.")
    assert S.claim_holds(sc, "the red object is a circle.")
    assert not S.claim_holds(sc, "the red object is a square.")
    assert S.claim_holds(sc, "the square is large and blue.")
    assert S.claim_holds(sc, "the square is in the top right corner.")
    assert S.claim_holds(sc, "the number of objects in the image is three.")
    assert not S.claim_holds(sc, "there are two objects.")
    with pytest.raises(ValueError, match="names 2 objects"):
        S.claim_holds(sc, "the circle is red.")
    with pytest.raises(ValueError, match="cannot parse"):
        S.claim_holds(sc, "the square is happy.")


def test_hellaswag_rows_have_exactly_one_true_ending(world):
    path = world / "hellaswag" / "shapes_val.jsonl"
    examples = load_examples(path)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(examples) == len(raw) == TINY["n_hellaswag"]
    kinds, labels = Counter(), Counter()
    for i, row in enumerate(raw):
        assert {
            "ind",
            "ctx",
            "ctx_a",
            "ctx_b",
            "label",
            "endings",
            "activity_label",
            "split",
            "source_id",
        } <= set(row)
        assert row["ind"] == i and row["split"] == "val" and row["source_id"] == "shapes"
        assert row["ctx"] == f"{row['ctx_a']} {row['ctx_b']}"
        assert len(row["endings"]) == 4 and len(set(row["endings"])) == 4
        assert all(not e.startswith(" ") and set(words(e)) <= WORLD_WORDS for e in row["endings"])
        sc = Scene.from_dict(row["scene"])
        # The context mentions every object truly, and the scene makes exactly the labelled ending true.
        assert S.caption_matches_scene(row["ctx_a"], sc), row["ctx_a"]
        truth = [S.claim_holds(sc, f"{row['ctx_b']} {e}") for e in row["endings"]]
        assert truth.count(True) == 1 and truth[row["label"]], row
        kinds[row["activity_label"]] += 1
        labels[row["label"]] += 1
    assert len(kinds) == len(S.QUESTION_KINDS) and len(labels) > 1


def test_images_and_coco_annotations(world):
    from pycocotools.coco import COCO

    root = world / "images"
    ids = {}
    for split, n in (("train", TINY["n_train_images"]), ("val", TINY["n_val_images"])):
        coco = COCO(str(root / "annotations" / f"captions_{split}.json"))
        ids[split] = set(coco.getImgIds())
        assert len(ids[split]) == n
        scenes = S.load_scenes(root / "annotations" / f"scenes_{split}.json")
        assert set(scenes) == ids[split]
        for image_id in ids[split]:
            info = coco.loadImgs(image_id)[0]
            with Image.open(root / split / info["file_name"]) as img:
                assert img.mode == "RGB" and img.size == (64, 64) == (info["width"], info["height"])
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            assert len(set(captions)) >= 5
            # Ground truth scores 1.0, caption by caption.
            assert S.object_accuracy(dict.fromkeys([image_id], captions[0]), scenes) == 1.0
            assert all(S.caption_matches_scene(c, scenes[image_id]) for c in captions)
    assert not ids["train"] & ids["val"]
    ann_ids = [
        a["id"]
        for s in ("train", "val")
        for a in json.loads((root / "annotations" / f"captions_{s}.json").read_text())["annotations"]
    ]
    assert len(ann_ids) == len(set(ann_ids))


def test_every_caption_style_is_true_and_corruptions_score_zero():
    rng = random.Random(2)
    scenes, truths, swapped, recounted = {}, {}, {}, {}
    for image_id in range(300):
        sc = S.sample_scene(rng)
        absent = next(c for c in S.COLORS if c not in {o.color for o in sc.objects})
        for k, style in enumerate(S.STYLES):
            key = image_id * 10 + k
            scenes[key] = sc
            truths[key] = S.describe(sc, rng, style)
            swapped[key] = truths[key].replace(sc.objects[0].color, absent, 1)
            if style == "count":
                n = len(sc.objects)
                recounted[key] = truths[key].replace(f"{S.NUMBER_WORDS[n]} ", f"{S.NUMBER_WORDS[n + 1]} ", 1)
    assert S.object_accuracy(truths, scenes) == 1.0
    assert S.object_accuracy(swapped, scenes) == 0.0
    assert S.object_accuracy(recounted, scenes) == 0.0


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
    assert S.caption_matches_scene(caption, sc) is ok
    assert S.object_accuracy({7: caption}, {"7": sc.to_dict()}) == float(ok)


def test_counts_in_words_and_digits():
    sc = scene(
        ("red", "circle", "small", 0, 0), ("red", "circle", "large", 1, 2), ("yellow", "star", "small", 2, 2)
    )
    for caption in (
        "two red circles and a yellow star.",
        "2 red circles and one yellow star.",
        "three shapes: a yellow star and two red circles.",
    ):
        assert S.caption_matches_scene(caption, sc), caption
    assert not S.caption_matches_scene("three red circles and a yellow star.", sc)
    with pytest.raises(KeyError, match="no scene for image_id 5"):
        S.object_accuracy({5: "a red circle."}, {})


def test_rerun_rewrites_nothing_and_restores_deleted_files_identically(world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    S.prepare_shapes(copy, seed=0, **TINY)
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before

    gone = [
        copy / "images/train/00000003.png",
        copy / "text/shapes_train_000002.npy",
        copy / "hellaswag/shapes_val.jsonl",
    ]
    for p in gone:
        p.unlink()
    S.prepare_shapes(copy, seed=0, **TINY)
    assert files(copy) == files(world)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p not in gone)
    with pytest.raises(ValueError, match="seed"):
        S.prepare_shapes(copy, seed=1, **TINY)


def test_rendering_puts_each_colour_at_its_object_centre():
    rng = random.Random(3)
    for _ in range(100):
        sc = S.sample_scene(rng)
        pixels = np.asarray(S.render_scene(sc, 64))  # (H, W, 3)
        for o in sc.objects:
            x, y = S.object_center_px(o, 64)
            assert tuple(pixels[y, x]) == S.RGB[o.color], (o, pixels[y, x])
    assert tuple(pixels[0, 0]) == S.BACKGROUND or any(o.cell == (0, 0) for o in sc.objects)
    # Large objects cover clearly more pixels than small ones of the same shape.
    area = {}
    for size in S.SIZES:
        img = np.asarray(S.render_scene(scene(("red", "circle", size, 1, 1)), 64))
        area[size] = int((img != S.BACKGROUND).any(-1).sum())
    assert area["large"] > 2 * area["small"] > 0
