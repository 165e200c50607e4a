"""Caption metrics on the COCO caption evaluation scale: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

Two backends give the same numbers for BLEU, ROUGE-L and CIDEr-D on the same tokens:
- "pycocoevalcap": the reference implementation. Stanford PTBTokenizer (Java), `Bleu(4)`, `Meteor` (Java; when it
  fails, METEOR is None), `Rouge`, `Cider` (pycocoevalcap's `Cider` is the CIDEr-D variant: clipped tf-idf
  n-gram cosine with a Gaussian length penalty, sigma 6, times 10).
- "python": no Java. A regex tokeniser that approximates PTBTokenizer (lower case, split punctuation and clitics,
  then drop the same punctuation list), and re-implementations of the three scorers, including their quirks:
  BLEU uses the closest reference length and the same 1e-9/1e-15 smoothing constants, CIDEr-D takes document
  frequencies from the references of the evaluated images and measures the length penalty in bigram counts.
  METEOR has no pure-Python equivalent and is None.
"auto" picks pycocoevalcap when `java` is on PATH.

Scale: BLEU, METEOR and ROUGE-L in 0..1; CIDEr-D unscaled (a paper's "CIDEr 113" is 1.13 here).
SPICE is left out: it needs Stanford CoreNLP model jars that pycocoevalcap downloads on first use, and this
project must run offline.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
BACKENDS = ("auto", "pycocoevalcap", "python")

# pycocoevalcap's PTBTokenizer removes exactly these tokens. It compares after lower-casing, so bracket tokens
# ("-lrb-") survive; the Python tokeniser reproduces that.
PTB_PUNCTUATIONS = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
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


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation


def ptb_tokenize(text: str) -> str:
    """Approximate `PTBTokenizer -lowerCase` + pycocoevalcap's punctuation removal; returns space-joined tokens."""
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
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS)


def _tokenize_java(captions: dict) -> dict:
    """pycocoevalcap's PTBTokenizer on {key: [caption, ...]} (one Java process for everything)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTBTokenizer aligns captions to output lines, so a caption must not contain a line break of its own.
    packed = {key: [{"caption": " ".join(c.splitlines())} for c in caps] for key, caps in captions.items()}
    return PTBTokenizer().tokenize(packed)


# ---------------------------------------------------------------------------------------------------------------
# Pure-Python scorers. Inputs as pycocoevalcap's: gts {id: [ref, ...]}, res {id: [hyp]}, space-joined tokens.


def _ngram_counts(words: list[str], n: int = 4) -> dict[tuple, int]:
    counts = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(gts: dict, res: dict, n: int = 4) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-image BLEU-1..n, as pycocoevalcap's `Bleu(n)` with the "closest" ref length."""
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's constants: 0 matches give ~0, not a division by zero
    total_test = total_ref = 0
    total_guess, total_correct = [0] * n, [0] * n
    per_image = []
    for key in gts:
        hyp = res[key][0].split()
        refs = [ref.split() for ref in gts[key]]
        max_ref_counts = {}
        for ref in refs:
            for gram, count in _ngram_counts(ref, n).items():
                max_ref_counts[gram] = max(max_ref_counts.get(gram, 0), count)
        test_len = len(hyp)
        ref_len = min((abs(len(ref) - test_len), len(ref)) for ref in refs)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in _ngram_counts(hyp, n).items():
            correct[len(gram) - 1] += min(max_ref_counts.get(gram, 0), count)

        per_image.append(_bleu_from_counts(correct, guess, test_len, ref_len, small, tiny))
        total_test += test_len
        total_ref += ref_len
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
    overall = _bleu_from_counts(total_correct, total_guess, total_test, total_ref, small, tiny)
    return overall, per_image


def _bleu_from_counts(correct, guess, test_len, ref_len, small, tiny) -> list[float]:
    scores, precision_product = [], 1.0
    for k in range(len(correct)):
        precision_product *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
        scores.append(precision_product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:  # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(gts: dict, res: dict, beta: float = 1.2) -> tuple[float, list[float]]:
    """Mean and per-image ROUGE-L (LCS F-measure from the best precision and best recall over refs)."""
    per_image = []
    for key in gts:
        hyp = res[key][0].split(" ")  # split(" ") as pycocoevalcap: an empty caption is one empty token
        precisions, recalls = [], []
        for ref in gts[key]:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, hyp)
            precisions.append(lcs / float(len(hyp)))
            recalls.append(lcs / float(len(ref_tokens)))
        p, r = max(precisions), max(recalls)
        per_image.append(((1 + beta**2) * p * r) / float(r + beta**2 * p) if p != 0 and r != 0 else 0.0)
    return float(np.mean(per_image)), per_image


def cider_d(gts: dict, res: dict, n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """Mean and per-image CIDEr-D as pycocoevalcap's `Cider` computes it (document frequencies from `gts`)."""
    keys = list(gts)
    ref_counts = [[_ngram_counts(ref.split(), n) for ref in gts[key]] for key in keys]
    hyp_counts = [_ngram_counts(res[key][0].split(), n) for key in keys]
    doc_freq = defaultdict(float)
    for refs in ref_counts:
        for gram in {gram for ref in refs for gram in ref}:
            doc_freq[gram] += 1
    log_n_docs = np.log(float(len(keys)))

    def tfidf(counts):
        vec, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_n_docs - np.log(max(1.0, doc_freq.get(gram, 0.0))))
            norm[k] += pow(vec[k][gram], 2)
            if k == 1:  # sic: pycocoevalcap's "length" counts bigrams, and the penalty uses that
                length += tf
        return vec, [np.sqrt(x) for x in norm], length

    def similarity(hyp, ref):
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        delta = float(len_h - len_r)
        val = [0.0] * n
        for k in range(n):
            for gram, weight in vec_h[k].items():
                ref_weight = vec_r[k].get(gram, 0.0)
                val[k] += min(weight, ref_weight) * ref_weight  # clipping: "D" in CIDEr-D
            if norm_h[k] != 0 and norm_r[k] != 0:
                val[k] /= norm_h[k] * norm_r[k]
            val[k] *= np.e ** (-(delta**2) / (2 * sigma**2))
        return np.array(val)

    per_image = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        hyp_vec = tfidf(hyp)
        total = np.zeros(n)
        for ref in refs:
            total += similarity(hyp_vec, tfidf(ref))
        per_image.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(per_image)), per_image


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def _meteor(gts: dict, res: dict) -> tuple[float | None, list[float] | None]:
    """pycocoevalcap's METEOR (a Java subprocess), or (None, None) with a warning when it fails."""
    from pycocoevalcap.meteor.meteor import Meteor

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
        raise ValueError(f"unknown caption-metrics backend {backend!r}; expected one of {BACKENDS}")
    has_java = shutil.which("java") is not None
    if backend == "auto":
        return "pycocoevalcap" if has_java else "python"
    if backend == "pycocoevalcap" and not has_java:
        raise RuntimeError("backend 'pycocoevalcap' needs Java on PATH (PTBTokenizer, METEOR); use 'python'")
    return backend


def score_captions(
    predictions: dict[int, str], references: dict[int, list[str]], *, backend: str = "auto"
) -> tuple[dict, dict[int, dict]]:
    """Score one predicted caption per image against that image's references.

    Only the images in `predictions` are scored (CIDEr-D's document frequencies come from their references).
    Returns `(overall, per_image)`: overall has exactly the keys bleu1 bleu2 bleu3 bleu4 meteor rouge_l cider
    (meteor None on the python backend or when Java's METEOR fails); per_image[id] has bleu1..bleu4, rouge_l,
    cider, and meteor when available.
    """
    backend = resolve_backend(backend)
    if not predictions:
        raise ValueError("no predictions to score")
    for image_id in predictions:
        refs = references.get(image_id)
        if not refs:
            raise ValueError(f"image_id {image_id!r} has a prediction but no reference captions")
    ids = sorted(predictions)
    if backend == "pycocoevalcap":
        tokens = _tokenize_java(
            {**{("ref", i): references[i] for i in ids}, **{("hyp", i): [predictions[i]] for i in ids}}
        )
        gts = {i: tokens[("ref", i)] for i in ids}
        res = {i: tokens[("hyp", i)] for i in ids}
    else:
        gts = {i: [ptb_tokenize(c) for c in references[i]] for i in ids}
        res = {i: [ptb_tokenize(predictions[i])] for i in ids}

    if backend == "pycocoevalcap":
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        bleu_all, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
        rouge_all, rouge_each = Rouge().compute_score(gts, res)
        cider_all, cider_each = Cider().compute_score(gts, res)
        meteor_all, meteor_each = _meteor(gts, res)
        bleu_each = [list(per_image) for per_image in zip(*bleu_each)]  # (4, images) -> (images, 4)
    else:
        bleu_all, bleu_each = bleu(gts, res)
        rouge_all, rouge_each = rouge_l(gts, res)
        cider_all, cider_each = cider_d(gts, res)
        meteor_all, meteor_each = None, None

    overall = {f"bleu{k + 1}": float(bleu_all[k]) for k in range(4)}
    overall.update(meteor=meteor_all, rouge_l=float(rouge_all), cider=float(cider_all))
    per_image = {}
    for j, image_id in enumerate(ids):
        scores = {f"bleu{k + 1}": float(bleu_each[j][k]) for k in range(4)}
        scores.update(rouge_l=float(rouge_each[j]), cider=float(cider_each[j]))
        if meteor_each is not None:
            scores["meteor"] = meteor_each[j]
        per_image[image_id] = scores
    return {key: overall[key] for key in METRICS}, per_image


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None


def load_predictions(path: str | Path) -> dict[int, str]:
    """COCO results format `[{"image_id": …, "caption": …}, …]` → {image_id: caption} (one per image)."""
    path = Path(path)
    data = _read_json(path, "predictions")
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a list of {{'image_id', 'caption'}} objects (COCO results format)"
        )
    predictions = {}
    for i, entry in enumerate(data):
        for key in ("image_id", "caption"):
            if not isinstance(entry, dict) or key not in entry:
                raise ValueError(f"{path}: entry {i} has no key {key!r}")
        if not isinstance(entry["caption"], str):
            raise ValueError(f"{path}: entry {i}: key 'caption' must be a string")
        if entry["image_id"] in predictions:
            raise ValueError(f"{path}: image_id {entry['image_id']!r} appears more than once")
        predictions[entry["image_id"]] = entry["caption"]
    return predictions


def load_references(path: str | Path) -> dict[int, list[str]]:
    """COCO captions format (`{"annotations": [{"image_id", "caption"}, …]}`) → {image_id: [caption, …]}."""
    path = Path(path)
    data = _read_json(path, "annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected an object with an 'annotations' list (COCO captions format)")
    references = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        for key in ("image_id", "caption"):
            if not isinstance(ann, dict) or key not in ann:
                raise ValueError(f"{path}: annotations[{i}] has no key {key!r}")
        if not isinstance(ann["caption"], str):
            raise ValueError(f"{path}: annotations[{i}]: key 'caption' must be a string")
        references[ann["image_id"]].append(ann["caption"])
    return dict(references)


def score_results_file(
    pred_json: str | Path, ann_json: str | Path, backend: str = "auto"
) -> tuple[dict, dict[int, dict]]:
    """`score_captions` on a COCO results file against COCO caption annotations (only predicted images)."""
    predictions = load_predictions(pred_json)
    references = load_references(ann_json)
    for image_id in predictions:
        if image_id not in references:
            raise ValueError(f"{ann_json}: no captions for image_id {image_id!r} (predicted in {pred_json})")
    return score_captions(predictions, references, backend=backend)
