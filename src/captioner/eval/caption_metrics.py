"""Caption metrics on the COCO caption evaluation scale: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

The scores come from pycocoevalcap's own scorers (`Bleu(4)`, `Rouge`, `Cider`, the CIDEr-D variant), so they
are the reference numbers; COCO annotation and results files are indexed by pycocotools. The two backends
differ only where pycocoevalcap needs Java:
- "pycocoevalcap": Stanford PTBTokenizer (Java) and METEOR (Java; None when it fails).
- "python": no Java. `ptb_tokenize`, a regex tokenizer that approximates PTBTokenizer, and METEOR None (it has
  no pure-Python equivalent).
"auto" picks pycocoevalcap when `java` is on PATH.

Not pycocoevalcap's `COCOEvalCap`: it needs Java, computes SPICE (whose CoreNLP jars it downloads on first
use, and this project runs offline) and prints progress to stdout, where the eval CLI writes its JSON.

Scale: BLEU, METEOR and ROUGE-L in 0..1; CIDEr-D unscaled (a paper's "CIDEr 113" is 1.13 here).
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from captioner.data.coco_format import load_annotations, load_results, load_results_against
from captioner.errors import UserError

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
BACKENDS = ("auto", "pycocoevalcap", "python")

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
}
# A trailing period stays on these (PTB's abbreviation list, the part that shows up in captions).
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "jr",
    "sr",
    "vs",
    "etc",
    "mt",
    "ft",
    "ave",
    "inc",
    "co",
    "ltd",
}


# ------------------------------------------------------------------------------------------------------------
# Tokenisation


def ptb_tokenize(text: str) -> str:
    """Approximate `PTBTokenizer -lowerCase` + pycocoevalcap's punctuation removal, as space-joined tokens.

    The fallback for machines without Java: pycocoevalcap has no pure-Python tokenizer.
    """
    text = " ".join(text.splitlines()).lower()
    text = re.sub(r"[\"“”]", " ", text)  # double quotes become `` and '' in PTB, which are then removed
    text = text.replace("’", "'").replace("‘", " ` ")
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, f" {token} ")
    text = re.sub(r"\.\.+|…", " ... ", text)
    text = re.sub(r"--+", " -- ", text)
    text = re.sub(r"[!?]+", lambda m: f" {m.group()} ", text)
    text = re.sub(r";", " ; ", text)
    text = re.sub(r"(?<!\d)([,:])|([,:])(?!\d)", r" \1\2 ", text)  # "1,000" and "10:30" stay whole
    text = re.sub(r"([$%])", r" \1 ", text)
    text = re.sub(r"#(?=\d)", " # ", text)
    text = re.sub(r"(?<=\w)(n't|'s|'m|'d|'ll|'re|'ve)\b", r" \1", text)

    tokens = []
    for token in text.split():
        # Quotes and hyphens at a word's edge are separate (then removed) tokens; inside a word they stay.
        if re.match(r"[`'][^\d`']", token) and not re.fullmatch(r"'(s|m|d|ll|re|ve)", token):
            token = token[1:]
        if re.search(r"[^`']'$", token) and not token.endswith("n't"):
            token = token[:-1]
        if token not in _BRACKETS.values():
            token = token.strip("-") or token
        # A sentence-final period is split off, except from abbreviations ("a.m.", "mr.") and initials.
        if token.endswith(".") and len(token) > 1:
            stem = token[:-1]
            if not ("." in stem or stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
                token = stem
        tokens.extend(_SPLIT_WORDS.get(token, token).split())
    # pycocoevalcap drops its PUNCTUATIONS after lower-casing, so bracket tokens ("-lrb-") survive, as here.
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def tokenize_java(captions: dict) -> dict:
    """pycocoevalcap's PTBTokenizer on {key: [caption, ...]} (one Java process for everything)."""
    # PTBTokenizer aligns captions to output lines, so a caption must not contain a line break of its own.
    packed = {key: [{"caption": " ".join(c.splitlines())} for c in caps] for key, caps in captions.items()}
    return PTBTokenizer().tokenize(packed)


# ------------------------------------------------------------------------------------------------------------
# Scoring


def _meteor(gts: dict, res: dict) -> tuple[float | None, list[float] | None]:
    """pycocoevalcap's METEOR (a Java subprocess), or (None, None) with a warning when it fails."""
    try:
        scorer = Meteor()
    except OSError as err:
        warnings.warn(f"METEOR unavailable ({err}); reporting meteor=None", stacklevel=3)
        return None, None
    try:
        score, scores = scorer.compute_score(gts, res)
        return float(score), [float(s) for s in scores]
    except Exception as err:  # a dead or out-of-memory JVM shows up as broken pipes or empty output lines
        warnings.warn(f"METEOR failed ({type(err).__name__}: {err}); reporting meteor=None", stacklevel=3)
        return None, None
    finally:
        # compute_score leaves its lock held when it fails midway, and Meteor.__del__ (which stops the JVM)
        # would then block forever.
        if scorer.lock.locked():
            scorer.lock.release()
        del scorer


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown caption-metrics backend {backend!r}; expected one of {BACKENDS}")
    has_java = shutil.which("java") is not None
    if backend == "auto":
        return "pycocoevalcap" if has_java else "python"
    if backend == "pycocoevalcap" and not has_java:
        raise UserError("backend 'pycocoevalcap' needs Java on PATH (PTBTokenizer, METEOR); use 'python'")
    return backend


def score_captions(
    predictions: dict[int, str], references: dict[int, list[str]], *, backend: str = "auto"
) -> tuple[dict[str, float | None], dict[int, dict[str, float]]]:
    """Score one predicted caption per image against that image's references.

    Only the images in `predictions` are scored (CIDEr-D's document frequencies come from their references).
    Returns `(overall, per_image)`: overall has exactly the keys bleu1 bleu2 bleu3 bleu4 meteor rouge_l cider
    (meteor None on the python backend or when Java's METEOR fails); per_image[id] has bleu1..bleu4, rouge_l,
    cider, and meteor when available.
    """
    backend = resolve_backend(backend)
    if not predictions:
        raise UserError("no predictions to score")
    for image_id in predictions:
        if not references.get(image_id):
            raise UserError(f"image_id {image_id!r} has a prediction but no reference captions")
    ids = sorted(predictions)
    if backend == "pycocoevalcap":
        tokens = tokenize_java(
            {**{("ref", i): references[i] for i in ids}, **{("hyp", i): [predictions[i]] for i in ids}}
        )
        gts = {i: tokens[("ref", i)] for i in ids}
        res = {i: tokens[("hyp", i)] for i in ids}
    else:
        gts = {i: [ptb_tokenize(c) for c in references[i]] for i in ids}
        res = {i: [ptb_tokenize(predictions[i])] for i in ids}

    bleu_all, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: it prints to stdout
    rouge_all, rouge_each = Rouge().compute_score(gts, res)
    cider_all, cider_each = Cider().compute_score(gts, res)
    meteor_all, meteor_each = _meteor(gts, res) if backend == "pycocoevalcap" else (None, None)

    overall = {f"bleu{k + 1}": float(bleu_all[k]) for k in range(4)}
    overall.update(meteor=meteor_all, rouge_l=float(rouge_all), cider=float(cider_all))
    per_image = {}
    for j, image_id in enumerate(ids):
        scores = {f"bleu{k + 1}": float(bleu_each[k][j]) for k in range(4)}
        scores.update(rouge_l=float(rouge_each[j]), cider=float(cider_each[j]))
        if meteor_each is not None:
            scores["meteor"] = meteor_each[j]
        per_image[image_id] = scores
    return {key: overall[key] for key in METRICS}, per_image


class CaptionScorer:
    """`score_captions` with its backend fixed, for configs to name as
    `_target_: captioner.eval.caption_metrics.CaptionScorer`. Validation scorers share its call,
    `scorer(predictions, references) -> (overall, per_image)`.
    """

    def __init__(self, backend: str = "auto"):
        # A bad name or a missing Java then fails when the config is built, not at the first validation.
        resolve_backend(backend)
        self.backend = backend

    def __call__(
        self, predictions: dict[int, str], references: dict[int, list[str]]
    ) -> tuple[dict[str, float | None], dict[int, dict[str, float]]]:
        return score_captions(predictions, references, backend=self.backend)

    def __repr__(self) -> str:
        return f"CaptionScorer(backend={self.backend!r})"


# ------------------------------------------------------------------------------------------------------------
# COCO files


def load_predictions(path: str | Path) -> dict[int, str]:
    """COCO results format `[{"image_id": …, "caption": …}, …]` → {image_id: caption} (one per image)."""
    # Without an annotation set there is nothing for pycocotools' loadRes to load the results against.
    return {entry["image_id"]: entry["caption"] for entry in load_results(path)}


def load_references(path: str | Path) -> dict[int, list[str]]:
    """COCO captions file → {image_id: [caption, …]} for the images that have captions."""
    return {i: [a["caption"] for a in anns] for i, anns in load_annotations(path).imgToAnns.items()}


def score_results_file(
    pred_json: str | Path, ann_json: str | Path, backend: str = "auto"
) -> tuple[dict[str, float | None], dict[int, dict[str, float]]]:
    """`score_captions` on a COCO results file against COCO caption annotations (only predicted images)."""
    results = load_results(pred_json)
    gt = load_annotations(ann_json)
    for entry in results:
        if not gt.imgToAnns.get(entry["image_id"]):
            raise UserError(
                f"{ann_json}: no captions for image_id {entry['image_id']!r} (predicted in {pred_json})"
            )
    res = load_results_against(results, gt)
    predictions = {i: anns[0]["caption"] for i, anns in res.imgToAnns.items()}
    references = {i: [a["caption"] for a in gt.imgToAnns[i]] for i in predictions}
    return score_captions(predictions, references, backend=backend)
