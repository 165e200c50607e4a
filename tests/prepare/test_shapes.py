"""Writing the shapes world: determinism, the production formats, idempotence."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.captions import encode_captions
from captioner.data.hellaswag import load_examples, render_example
from captioner.eval.hellaswag import score_hellaswag
from captioner.models.compact_vocab import build_lm, lm_config
from captioner.prepare.shapes import prepare_shapes
from captioner.shapes.accuracy import caption_matches_scene, object_accuracy
from captioner.shapes.text import split_words
from captioner.shapes.world import COLORS, SHAPES, load_scenes
from captioner.tokenizer import EOT, gpt2_encoding
from tests.shapes.test_text import WORLD_WORDS

TINY = dict(
    train_tokens=20_000, val_tokens=5_000, n_train_images=8, n_val_images=4, n_hellaswag=40, shard_size=8_000
)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "world"
    prepare_shapes(out, seed=0, **TINY)
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(world, tmp_path):
    prepare_shapes(tmp_path / "same", seed=0, **TINY)
    prepare_shapes(tmp_path / "other", seed=1, **TINY)
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
            assert set(split_words(doc)) <= WORLD_WORDS, doc
            shapes = {w.removesuffix("s") for w in split_words(doc)} & set(SHAPES)
            assert set(split_words(doc)) & set(COLORS) and shapes, doc


def test_vocab_ids_cover_everything_a_world_lm_reads_and_nothing_else(world):
    """The ids an LM of this world needs (CompactVocabConfig.vocab_ids): every token of the shards, of the HellaSwag rows
    as the scorer renders them and of the captions as the caption data encodes them; each a piece of world
    English."""
    ids = json.loads((world / "vocab_ids.json").read_text())
    assert ids == sorted(set(ids)) and EOT in ids and len(ids) < 150
    enc = gpt2_encoding()
    for piece in (enc.decode([t]).strip() for t in ids if t != EOT):
        assert piece in WORLD_WORDS or piece in {".", ",", ":", "s"}, piece
    listed = set(ids)
    for shard in (world / "text").glob("*.npy"):
        assert set(np.load(shard).tolist()) <= listed, shard.name
    for example in load_examples(world / "hellaswag" / "shapes_val.jsonl"):
        rows, _ = render_example(example, enc)
        assert {t for row in rows for t in row} <= listed
    for split in ("train", "val"):
        coco = json.loads((world / "images" / "annotations" / f"captions_{split}.json").read_text())
        tokens, _ = encode_captions([a["caption"] for a in coco["annotations"]], enc, max_tokens=64)
        assert set(tokens.tolist()) <= listed
    # an LM over exactly these ids reads and scores every question of this world
    model = build_lm(lm_config({"name": "tiny", "vocab_ids": str(world / "vocab_ids.json")}))
    assert model.lm_head.weight.shape[0] == len(ids)
    counts = score_hellaswag(model, load_examples(world / "hellaswag" / "shapes_val.jsonl"), batch_size=8)
    assert counts["n"] == TINY["n_hellaswag"]


def test_hellaswag_file_is_in_the_hellaswag_format(world):
    path = world / "hellaswag" / "shapes_val.jsonl"
    examples = load_examples(path)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(examples) == len(raw) == TINY["n_hellaswag"]
    keys = {
        "ind",
        "ctx",
        "ctx_a",
        "ctx_b",
        "label",
        "endings",
        "activity_label",
        "split",
        "source_id",
        "scene",
    }
    assert all(keys <= set(row) for row in raw)


def test_images_and_coco_annotations(world):
    from pycocotools.coco import COCO

    root = world / "images"
    ids = {}
    for split, n in (("train", TINY["n_train_images"]), ("val", TINY["n_val_images"])):
        coco = COCO(str(root / "annotations" / f"captions_{split}.json"))
        ids[split] = set(coco.getImgIds())
        assert len(ids[split]) == n
        scenes = load_scenes(root / "annotations" / f"scenes_{split}.json")
        assert set(scenes) == ids[split]
        for image_id in ids[split]:
            info = coco.loadImgs(image_id)[0]
            with Image.open(root / split / info["file_name"]) as img:
                assert img.mode == "RGB" and img.size == (64, 64) == (info["width"], info["height"])
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            assert len(set(captions)) >= 5
            # Ground truth scores 1.0, caption by caption.
            assert object_accuracy(dict.fromkeys([image_id], captions[0]), scenes) == 1.0
            assert all(caption_matches_scene(c, scenes[image_id]) for c in captions)
    assert not ids["train"] & ids["val"]
    ann_ids = [
        a["id"]
        for s in ("train", "val")
        for a in json.loads((root / "annotations" / f"captions_{s}.json").read_text())["annotations"]
    ]
    assert len(ann_ids) == len(set(ann_ids))


def test_rerun_rewrites_nothing_and_restores_deleted_files_identically(world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    prepare_shapes(copy, seed=0, **TINY)
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before

    gone = [
        copy / "images/train/00000003.png",
        copy / "text/shapes_train_000002.npy",
        copy / "hellaswag/shapes_val.jsonl",
    ]
    for p in gone:
        p.unlink()
    prepare_shapes(copy, seed=0, **TINY)
    assert files(copy) == files(world)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p not in gone)
    with pytest.raises(ValueError, match="seed"):
        prepare_shapes(copy, seed=1, **TINY)
