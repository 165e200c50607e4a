"""Whole-split evaluation on a tiny shapes world: every image captioned once, scores equal the results file's,
resume after a kill, unreadable images skipped and counted, feature cache = pixels."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

from captioner.data.coco_format import annotation_path
from captioner.data.feature_cache import build_feature_cache
from captioner.errors import UserError
from captioner.eval import coco_split
from captioner.eval.caption_metrics import METRICS, score_results_file
from captioner.eval.coco_split import evaluate_split, progress_path
from captioner.models.captioner import Captioner, build_captioner, generation_settings, load_captioner
from captioner.models.gpt import GPTConfig
from captioner.models.vision import VisionEncoder
from captioner.prepare.shapes import prepare_shapes
from captioner.tokenizer import EOT
from tests.helpers import TINY_CLIP

WORLD = dict(seed=0, train_tokens=20000, val_tokens=5000, n_train_images=8, n_val_images=6, n_hellaswag=8)
VAL_IDS = list(range(9, 15))  # the tiny world's val image ids, in annotation-file order


def make_world(out) -> None:
    """The tiny shapes world: 64 px images in out/images/{train,val}, annotations in out/images/annotations."""
    prepare_shapes(out, **WORLD)


def write_caption_checkpoint(path, generation: dict | None = None, seed: int = 0) -> None:
    """A caption run's Lightning checkpoint of a tiny random captioner whose captions depend on the image: open
    gates, and no EOT in the output (tied embeddings make a random LM repeat its prompt, EOT, at once)."""
    torch.manual_seed(seed)
    lm = {"config": dataclasses.asdict(GPTConfig.named("tiny"))}
    vision = {"clip": None, "clip_config": TINY_CLIP}
    model = build_captioner(lm, vision, cross_every=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(1.0)
        model.lm.transformer.wte.weight[EOT] = 0
    hparams = {
        "lm": lm,
        "vision": vision,
        "cross_every": 1,
        "trainable": ["xattn"],
        "generation": generation or {"method": "greedy", "max_new_tokens": 8},
    }
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state, "global_step": 0}, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_world(out)
    return out / "images"


@pytest.fixture
def root(world, tmp_path):
    """A private copy of the world's images: tests write results, caches and broken images into it."""
    return shutil.copytree(world, tmp_path / "coco")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    write_caption_checkpoint(path)
    return path


def evaluate(ckpt, root, batch_size=4, num_workers=0, **kwargs):
    return evaluate_split(
        ckpt, root, "val", backend="python", batch_size=batch_size, num_workers=num_workers, **kwargs
    )


def read(path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.fixture
def count_captioned(monkeypatch):
    """Counts the images Captioner.caption is asked for; `fail_after` calls, it raises as a killed run stops."""
    calls = {"images": 0, "fail_after": None}
    real = Captioner.caption

    def caption(self, pixel_values=None, features=None, **generation):
        if calls["fail_after"] is not None and calls["fail_after"] == 0:
            raise RuntimeError("killed")
        if calls["fail_after"] is not None:
            calls["fail_after"] -= 1
        calls["images"] += len(pixel_values if features is None else features)
        return real(self, pixel_values, features, **generation)

    monkeypatch.setattr(Captioner, "caption", caption)
    return calls


def test_two_runs_last_checkpoints_never_share_a_results_file(ckpt, root, tmp_path):
    other = tmp_path / "run2" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    write_caption_checkpoint(other, seed=1)
    first = evaluate(ckpt, root)
    kept = first.results_path.read_text()
    second = evaluate(other, root)
    assert second.results_path != first.results_path and first.results_path.read_text() == kept
    assert evaluate(ckpt, root).results_path == first.results_path  # the same weights, the same file
    beam = evaluate(ckpt, root, beams=2)  # other decoding settings (this checkpoint decodes greedily)
    assert beam.results_path not in (first.results_path, second.results_path)


def test_every_image_captioned_once_into_a_valid_results_file(ckpt, root):
    result = evaluate(ckpt, root, num_workers=1)  # images decoded in a worker process
    assert result.results_path.parent == root / "results"
    assert re.fullmatch(r"val_last_[0-9a-f]{8}\.json", result.results_path.name)  # weights + decoding
    results = read(result.results_path)
    assert [r["image_id"] for r in results] == VAL_IDS
    assert len({r["caption"] for r in results}) > 1  # the captions depend on the image
    assert (result.n, result.skipped, result.source) == (6, 0, "pixels")
    assert result.images_per_sec > 0
    assert (
        tuple(result.scores) == METRICS and result.scores["meteor"] is None
    )  # no SPICE key without its jars
    assert not progress_path(result.results_path).exists()
    assert (
        score_results_file(result.results_path, annotation_path(root, "val"), backend="python")[0]
        == result.scores
    )


def test_scores_are_the_results_files_scores(ckpt, root, monkeypatch):
    # Caption text that overlaps the references, so every metric is non-zero and the document frequencies matter.
    texts = ["a small red circle", "a big blue square above a green star", "there is one yellow triangle"]
    monkeypatch.setattr(
        Captioner, "caption", lambda self, pixel_values, **k: [texts[i % 3] for i in range(len(pixel_values))]
    )
    result = evaluate(ckpt, root)
    expected, _ = score_results_file(result.results_path, annotation_path(root, "val"), backend="python")
    assert result.scores == expected
    assert result.scores["bleu1"] > 0 and result.scores["cider"] > 0


def test_a_killed_run_resumes_with_only_the_rest(ckpt, root, tmp_path, count_captioned):
    fresh = evaluate(ckpt, root, out=tmp_path / "fresh.json", batch_size=2)
    assert count_captioned["images"] == 6

    out = tmp_path / "resumed.json"
    count_captioned.update(images=0, fail_after=2)  # two batches of 2 reach the progress file, then the kill
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(ckpt, root, out=out, batch_size=2)
    assert not out.exists()
    lines = progress_path(out).read_text().splitlines()
    assert "header" in json.loads(lines[0]) and [json.loads(x)["image_id"] for x in lines[1:]] == VAL_IDS[:4]
    with open(progress_path(out), "a") as f:
        f.write('{"image_id": 13, "capt')  # killed mid-write

    count_captioned.update(images=0, fail_after=None)
    resumed = evaluate(ckpt, root, out=out, batch_size=2)
    assert count_captioned["images"] == 2
    assert read(out) == read(fresh.results_path)
    assert resumed.scores == fresh.scores and resumed.n == 6
    assert not progress_path(out).exists()


def test_progress_of_other_weights_or_settings_is_not_resumed(ckpt, root, tmp_path, count_captioned):
    out = tmp_path / "results.json"
    header = {"split": "val", "weights": "0123456789abcdef", "generation": {"method": "greedy"}}
    progress_path(out).write_text(
        json.dumps({"header": header}) + "\n" + json.dumps({"image_id": 9, "caption": "stale"}) + "\n"
    )
    evaluate(ckpt, root, out=out)
    assert count_captioned["images"] == 6
    assert "stale" not in {r["caption"] for r in read(out)}


def test_unreadable_image_is_skipped_and_counted(ckpt, root, caplog):
    (root / "val" / "00000011.png").write_bytes(b"not a png")
    result = evaluate(ckpt, root)
    assert (result.n, result.skipped) == (5, 1)
    assert [r["image_id"] for r in read(result.results_path)] == [i for i in VAL_IDS if i != 11]
    assert "00000011.png" in caplog.text
    score_results_file(result.results_path, annotation_path(root, "val"), backend="python")  # still valid


def test_feature_cache_gives_the_pixels_captions(ckpt, root, tmp_path, caplog):
    pixels = evaluate(ckpt, root, out=tmp_path / "pixels.json")
    model, _ = load_captioner(ckpt)
    build_feature_cache(model.vision, root, "val", root / "features", image_size=64, batch_size=4)
    cached = evaluate(ckpt, root, out=tmp_path / "features.json")
    assert (pixels.source, cached.source) == ("pixels", "features")
    assert read(cached.results_path) == read(pixels.results_path)

    # A cache of another CLIP (same name, other weights) must not stand in for the model's.
    build_feature_cache(
        VisionEncoder(32, clip_config=TINY_CLIP), root, "val", root / "features", image_size=64
    )
    assert evaluate(ckpt, root, out=tmp_path / "other.json").source == "pixels"
    assert "another CLIP" in caplog.text


def test_generation_settings_come_from_the_checkpoint_with_beams_overriding():
    hparams = {"generation": {"method": "beam", "num_beams": 3, "max_new_tokens": 30}}
    assert generation_settings(hparams["generation"]) == hparams["generation"]
    assert generation_settings(hparams["generation"], beams=1) == {
        "method": "greedy",
        "num_beams": 3,
        "max_new_tokens": 30,
    }
    assert generation_settings(hparams["generation"], beams=5)["num_beams"] == 5
    assert generation_settings({"method": "greedy"}, beams=2)["method"] == "beam"
    assert generation_settings({}) == {"method": "beam"}  # validation's default decoding


def test_spice_is_left_out_without_its_jars(monkeypatch):
    from pycocoevalcap.spice import get_stanford_models as corenlp

    monkeypatch.setattr(corenlp, "SPICELIB", "no-such-lib")
    assert coco_split.spice_score({1: "a dog"}, {1: ["a dog runs"]}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no_root", "caption data root not found"),
        ("no_annotations", "caption annotations not found"),
        ("no_images", "image directory not found"),
        ("no_ckpt", "checkpoint not found"),
    ],
)
def test_missing_inputs_are_named(ckpt, root, tmp_path, change, message):
    if change == "no_root":
        root = tmp_path / "nowhere"
    elif change == "no_annotations":
        annotation_path(root, "val").unlink()
    elif change == "no_images":
        shutil.rmtree(root / "val")
    elif change == "no_ckpt":
        ckpt = tmp_path / "missing.ckpt"
    with pytest.raises(UserError, match=message):
        evaluate(ckpt, root)
