"""Caption metrics: the pure-Python scorers equal pycocoevalcap's on the same tokens; backends; results files."""

from __future__ import annotations

import json
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from captioner.eval import caption_metrics
from captioner.eval.caption_metrics import (
    METRICS,
    bleu,
    cider_d,
    ptb_tokenize,
    rouge_l,
    score_captions,
    score_results_file,
)

REFERENCES = {
    1: [
        "A man's riding a horse near the barn.",
        "A person rides a brown horse.",
        "Man on a horse, outdoors.",
    ],
    2: [
        "Two dogs play with a frisbee in the park!",
        "Dogs chasing a frisbee (on grass).",
        "Two dogs playing.",
    ],
    5: ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate."],
    7: ["A red stop sign on the corner of a street.", 'A "STOP" sign at an intersection.', "A stop sign."],
    9: [
        "A kitchen with stainless steel appliances.",
        "The kitchen has a fridge, a stove and a sink.",
        "Kitchen",
    ],
}
PREDICTIONS = {
    1: "a man riding a horse",
    2: "two dogs playing with a frisbee in a park.",
    5: "a plate of broccoli",
    7: "a stop sign on a street corner",
    9: "a bathroom with a toilet",
}


def tokenized(predictions, references):
    ids = sorted(predictions)
    gts = {i: [ptb_tokenize(c) for c in references[i]] for i in ids}
    res = {i: [ptb_tokenize(predictions[i])] for i in ids}
    return gts, res


def test_python_scorers_equal_pycocoevalcap_on_same_tokens():
    gts, res = tokenized(PREDICTIONS, REFERENCES)
    ref_bleu, ref_bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    ref_rouge, ref_rouge_each = Rouge().compute_score(gts, res)
    ref_cider, ref_cider_each = Cider().compute_score(gts, res)

    our_bleu, our_bleu_each = bleu(gts, res)
    our_rouge, our_rouge_each = rouge_l(gts, res)
    our_cider, our_cider_each = cider_d(gts, res)
    for k in range(4):
        assert our_bleu[k] == pytest.approx(ref_bleu[k], abs=1e-9)
        for j in range(len(gts)):
            assert our_bleu_each[j][k] == pytest.approx(ref_bleu_each[k][j], abs=1e-9)
    assert our_rouge == pytest.approx(ref_rouge, abs=1e-9)
    assert our_rouge_each == pytest.approx(list(ref_rouge_each), abs=1e-9)
    assert our_cider == pytest.approx(ref_cider, abs=1e-9)
    assert our_cider_each == pytest.approx(list(ref_cider_each), abs=1e-9)
    assert our_cider > 0 and 0 < our_bleu[3] < 1  # a non-degenerate fixture

    overall, per_image = score_captions(PREDICTIONS, REFERENCES, backend="python")
    assert tuple(overall) == METRICS and overall["meteor"] is None
    assert overall["bleu4"] == pytest.approx(ref_bleu[3], abs=1e-9)
    assert overall["cider"] == pytest.approx(ref_cider, abs=1e-9)
    assert set(per_image) == set(PREDICTIONS)
    assert per_image[9]["cider"] == pytest.approx(ref_cider_each[-1], abs=1e-9)
    assert {"bleu4", "rouge_l", "cider"} <= set(per_image[1])


@pytest.mark.parametrize(
    ("text", "tokens"),
    [  # PTBTokenizer -lowerCase outputs after pycocoevalcap's punctuation removal
        ('A man\'s riding a horse, near the "big" barn.', "a man 's riding a horse near the big barn"),
        ("Two dogs don't play (with) a frisbee!", "two dogs do n't play -lrb- with -rrb- a frisbee"),
        ("A black-and-white cat sits on a t-shirt...", "a black-and-white cat sits on a t-shirt"),
        ("At 10:30 a.m. Mr. Smith paid $5 -- 1,000 cannot", "at 10:30 a.m. mr. smith paid $ 5 1,000 can not"),
        ("A bus that says 'Downtown' on the front", "a bus that says downtown on the front"),
        ("the kids' toy; it's here?", "the kids toy it 's here"),
    ],
)
def test_python_tokenizer_matches_ptb(text, tokens):
    assert ptb_tokenize(text) == tokens


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for PTBTokenizer and METEOR")
def test_auto_backend_uses_java_and_reports_meteor():
    overall, per_image = score_captions(PREDICTIONS, REFERENCES, backend="auto")
    assert 0.0 < overall["meteor"] <= 1.0
    assert all(0.0 <= scores["meteor"] <= 1.0 for scores in per_image.values())
    # On this fixture the Python tokenizer agrees with PTBTokenizer, so the shared metrics agree too.
    python, _ = score_captions(PREDICTIONS, REFERENCES, backend="python")
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        assert overall[key] == pytest.approx(python[key], abs=1e-9)


def test_perfect_predictions():
    perfect = {i: refs[0] for i, refs in REFERENCES.items()}
    overall, _ = score_captions(perfect, REFERENCES, backend="python")
    assert overall["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert overall["rouge_l"] == pytest.approx(1.0)
    assert overall["cider"] > 1.0
    worse, _ = score_captions(PREDICTIONS, REFERENCES, backend="python")
    assert all(worse[k] < overall[k] for k in ("bleu1", "bleu4", "rouge_l", "cider"))


def test_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        score_captions(PREDICTIONS, REFERENCES, backend="java")
    with pytest.raises(ValueError, match="image_id 3"):
        score_captions({3: "a cat"}, REFERENCES, backend="python")
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Java"):
        score_captions(PREDICTIONS, REFERENCES, backend="pycocoevalcap")
    overall, _ = score_captions(PREDICTIONS, REFERENCES, backend="auto")  # falls back to python
    assert overall["meteor"] is None


def write_coco(tmp_path, predictions=PREDICTIONS, references=REFERENCES):
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
    captions = [(i, c) for i, caps in references.items() for c in caps]
    anns = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions)]
    ann = tmp_path / "captions_val.json"
    ann.write_text(json.dumps({"images": [{"id": i} for i in references], "annotations": anns}))
    return pred, ann


def test_results_file_scores_only_predicted_images(tmp_path):
    subset = {i: PREDICTIONS[i] for i in (1, 2, 7)}
    pred, ann = write_coco(tmp_path, predictions=subset)
    overall, per_image = score_results_file(pred, ann, backend="python")
    assert set(per_image) == {1, 2, 7}
    # CIDEr-D's document frequencies come from the scored images' references only.
    expected, _ = score_captions(subset, {i: REFERENCES[i] for i in subset}, backend="python")
    assert overall == expected


@pytest.mark.parametrize(
    ("which", "content", "needle"),
    [
        ("pred", "not json", "invalid JSON"),
        ("pred", {"image_id": 1}, "list"),
        ("pred", [{"image_id": 1}], "'caption'"),
        ("pred", [{"caption": "a"}], "'image_id'"),
        ("pred", [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], "more than once"),
        ("pred", [{"image_id": 4, "caption": "a"}], "image_id 4"),
        ("ann", [], "'annotations'"),
        ("ann", {"annotations": [{"image_id": 1}]}, "'caption'"),
    ],
)
def test_results_file_errors_name_file_and_key(tmp_path, which, content, needle):
    pred, ann = write_coco(tmp_path)
    path = pred if which == "pred" else ann
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=needle) as err:
        score_results_file(pred, ann, backend="python")
    assert path.name in str(err.value)


def test_results_file_missing(tmp_path):
    _, ann = write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        score_results_file(tmp_path / "missing.json", ann, backend="python")
