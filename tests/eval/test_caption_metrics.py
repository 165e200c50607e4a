"""Caption metrics: both backends give pycocoevalcap's scores; the regex tokenizer matches PTB; COCO files."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from captioner.errors import UserError
from captioner.eval import caption_metrics
from captioner.eval.caption_metrics import (
    METRICS,
    CaptionScorer,
    ptb_tokenize,
    score_captions,
    score_results_file,
    tokenize_java,
)
from captioner.shapes.text import captions_for
from captioner.shapes.world import sample_scene
from tests.eval.tricky_captions import PTB_DIFFERENCES, TRICKY_CAPTIONS

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for PTBTokenizer and METEOR")
SHARED = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")  # the metrics both backends compute

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


def test_python_backend_reports_pycocoevalcap_scores_per_image():
    ids = sorted(PREDICTIONS)
    gts = {i: [ptb_tokenize(c) for c in REFERENCES[i]] for i in ids}
    res = {i: [ptb_tokenize(PREDICTIONS[i])] for i in ids}
    ref_bleu, ref_bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    ref_rouge, ref_rouge_each = Rouge().compute_score(gts, res)
    ref_cider, ref_cider_each = Cider().compute_score(gts, res)
    assert ref_cider > 0 and 0 < ref_bleu[3] < 1  # a non-degenerate fixture

    overall, per_image = score_captions(PREDICTIONS, REFERENCES, backend="python")
    assert tuple(overall) == METRICS and overall["meteor"] is None
    assert [overall[f"bleu{k + 1}"] for k in range(4)] == pytest.approx(ref_bleu, abs=1e-12)
    assert overall["rouge_l"] == pytest.approx(ref_rouge, abs=1e-12)
    assert overall["cider"] == pytest.approx(ref_cider, abs=1e-12)
    assert list(per_image) == ids and all("meteor" not in scores for scores in per_image.values())
    for j, i in enumerate(ids):  # pycocoevalcap's per-image lists are in key order, BLEU's per n-gram order
        assert [per_image[i][f"bleu{k + 1}"] for k in range(4)] == pytest.approx(
            [ref_bleu_each[k][j] for k in range(4)], abs=1e-12
        )
        assert per_image[i]["rouge_l"] == pytest.approx(ref_rouge_each[j], abs=1e-12)
        assert per_image[i]["cider"] == pytest.approx(ref_cider_each[j], abs=1e-12)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [  # PTBTokenizer -lowerCase outputs after pycocoevalcap's punctuation removal
        ('A man\'s riding a horse, near the "big" barn.', "a man 's riding a horse near the big barn"),
        ("Two dogs don't play (with) a frisbee!", "two dogs do n't play -lrb- with -rrb- a frisbee"),
        ("A black-and-white cat sits on a t-shirt...", "a black-and-white cat sits on a t-shirt"),
        ("At 10:30 a.m. Mr. Smith paid $5 -- 1,000 cannot", "at 10:30 a.m. mr. smith paid $ 5 1,000 can not"),
        ("A bus that says 'Downtown' on the front", "a bus that says downtown on the front"),
        ("the kids' toy; it's here?", "the kids toy it 's here"),
        ("A Ph.D. student—at No. 5 St.", "a ph.d. student at no. 5 st."),
        ("a 2 1/2 year old's ½ cup, 100°F", "a 2\xa01/2 year old 's 1/2 cup 100 ° f"),
        ("'tis rock'n'roll, y'all: 'em o'clock", "'t is rock 'n' roll y' all 'em o'clock"),
        ("a £5 note & an A&W sign 🐶 *new*", "a # 5 note & an a&w sign * new *"),
    ],
)
def test_python_tokenizer_matches_ptb(text, tokens):
    assert ptb_tokenize(text) == tokens


def corpus_images() -> tuple[dict[int, str], dict[int, list[str]]]:
    """(predictions, references) of images whose captions come from the shapes world's generator, each image
    with one tricky caption among its 5 references and one appended to its prediction."""
    rng = random.Random(0)
    predictions, references = {}, {}
    for image_id in range(0, len(TRICKY_CAPTIONS), 2):
        captions = captions_for(sample_scene(rng), rng, 5)
        references[image_id] = [*captions[:4], TRICKY_CAPTIONS[image_id]]
        predictions[image_id] = " ".join([captions[4], *TRICKY_CAPTIONS[image_id + 1 : image_id + 2]])
    return predictions, references


@pytest.fixture(scope="module")
def java_tokens() -> dict[str, str]:
    """The jar's tokens of every corpus caption, tricky caption and PTB_DIFFERENCES line, from one Java run."""
    predictions, references = corpus_images()
    captions = {*predictions.values(), *(c for refs in references.values() for c in refs)}
    texts = sorted({*captions, *TRICKY_CAPTIONS, *PTB_DIFFERENCES})
    tokens = tokenize_java({i: [text] for i, text in enumerate(texts)})
    return {text: tokens[i][0] for i, text in enumerate(texts)}


@needs_java
def test_python_tokenizer_gives_the_jars_tokens_on_hundreds_of_captions(java_tokens):
    corpus = [text for text in java_tokens if text not in PTB_DIFFERENCES]
    assert len(corpus) > 800 and set(TRICKY_CAPTIONS) <= set(corpus)
    differ = {
        text: (java_tokens[text], ptb_tokenize(text))
        for text in corpus
        if ptb_tokenize(text) != java_tokens[text]
    }
    assert not differ  # {caption: (jar's tokens, ours)}


@needs_java
def test_python_tokenizer_differs_from_the_jar_only_where_documented(java_tokens):
    # The documented differences are still differences; one that now agrees moves to TRICKY_CAPTIONS.
    agree = [text for text in PTB_DIFFERENCES if ptb_tokenize(text) == java_tokens[text]]
    assert not agree


@needs_java
def test_java_and_python_backends_agree_on_hundreds_of_captions_and_java_reports_meteor():
    predictions, references = corpus_images()
    java, java_each = score_captions(predictions, references, backend="pycocoevalcap")
    assert 0.0 < java["meteor"] <= 1.0
    assert all(0.0 <= scores["meteor"] <= 1.0 for scores in java_each.values())
    python, python_each = score_captions(predictions, references, backend="python")
    assert python["meteor"] is None and 0.1 < python["bleu4"] < 0.9  # a non-degenerate corpus
    assert {k: java[k] for k in SHARED} == pytest.approx({k: python[k] for k in SHARED}, abs=1e-12)
    for i in predictions:
        assert {k: java_each[i][k] for k in SHARED} == pytest.approx(python_each[i], abs=1e-12)
    assert caption_metrics.resolve_backend("auto") == "pycocoevalcap"  # auto picks Java when it is there


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
    with pytest.raises(UserError, match="Java"):
        score_captions(PREDICTIONS, REFERENCES, backend="pycocoevalcap")
    overall, per_image = score_captions(PREDICTIONS, REFERENCES, backend="auto")  # falls back to python
    assert overall["meteor"] is None and "meteor" not in per_image[1]


def test_caption_scorer_from_config(monkeypatch):
    from hydra.utils import instantiate

    scorer = instantiate({"_target_": "captioner.eval.caption_metrics.CaptionScorer", "backend": "python"})
    assert isinstance(scorer, CaptionScorer)
    assert scorer(PREDICTIONS, REFERENCES) == score_captions(PREDICTIONS, REFERENCES, backend="python")
    with pytest.raises(ValueError, match="backend"):
        CaptionScorer("java")
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="Java"):  # when the config is built, not at the first validation
        CaptionScorer("pycocoevalcap")
    assert CaptionScorer()(PREDICTIONS, REFERENCES)[0]["meteor"] is None


def write_coco(tmp_path, predictions=PREDICTIONS, references=REFERENCES):
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
    captions = [(i, c) for i, caps in references.items() for c in caps]
    anns = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions)]
    ann = tmp_path / "captions_val.json"
    ann.write_text(json.dumps({"images": [{"id": i} for i in references], "annotations": anns}))
    return pred, ann


def test_results_file_scores_only_predicted_images(tmp_path, capsys):
    subset = {i: PREDICTIONS[i] for i in (1, 2, 7)}
    pred, ann = write_coco(tmp_path, predictions=subset)
    overall, per_image = score_results_file(pred, ann, backend="python")
    assert set(per_image) == {1, 2, 7}
    # CIDEr-D's document frequencies come from the scored images' references only.
    expected, _ = score_captions(subset, {i: REFERENCES[i] for i in subset}, backend="python")
    assert overall == expected
    assert capsys.readouterr().out == ""  # pycocotools' progress prints would break the CLI's JSON line


def test_results_file_image_without_captions(tmp_path):
    pred, ann = write_coco(tmp_path)
    data = json.loads(ann.read_text())
    data["images"].append({"id": 4})
    ann.write_text(json.dumps(data))
    pred.write_text(json.dumps([{"image_id": 4, "caption": "a cat"}]))
    with pytest.raises(ValueError, match="no captions for image_id 4") as err:
        score_results_file(pred, ann, backend="python")
    assert ann.name in str(err.value) and pred.name in str(err.value)


@pytest.mark.parametrize(
    ("which", "content", "needle"),
    [
        ("pred", "not json", "not valid JSON"),
        ("pred", {"image_id": 1}, "list"),
        ("pred", [], "no predictions"),
        ("pred", [{"image_id": 1}], "'caption'"),
        ("pred", [{"caption": "a"}], "'image_id'"),
        ("pred", [{"image_id": 1, "caption": 5}], "'caption' must be str"),
        ("pred", [{"image_id": "1", "caption": "a"}], "'image_id' must be int"),
        ("pred", [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], "more than once"),
        ("pred", [{"image_id": 4, "caption": "a"}], "image_id 4"),
        ("ann", "{", "not valid JSON"),
        ("ann", [], "'annotations'"),
        ("ann", {"annotations": []}, "'images'"),
        (
            "ann",
            {"images": [{"id": 1}], "annotations": [{"id": 0, "image_id": 1}]},
            r"annotations\[0\].*'caption'",
        ),
        ("ann", {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a"}]}, "'id'"),
        ("ann", {"images": [{}], "annotations": []}, r"images\[0\].*'id'"),
        ("ann", {"images": [], "annotations": [{"id": 0, "image_id": 1, "caption": "a"}]}, "not in 'images'"),
    ],
)
def test_results_file_errors_name_file_and_key(tmp_path, which, content, needle):
    pred, ann = write_coco(tmp_path)
    path = pred if which == "pred" else ann
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=needle) as err:
        score_results_file(pred, ann, backend="python")
    assert path.name in str(err.value)


@pytest.mark.parametrize("which", ["pred", "ann"])
def test_results_file_missing(tmp_path, which):
    files = dict(zip(("pred", "ann"), write_coco(tmp_path)))
    files[which] = tmp_path / "missing.json"
    with pytest.raises(UserError, match=r"missing\.json"):
        score_results_file(files["pred"], files["ann"], backend="python")
