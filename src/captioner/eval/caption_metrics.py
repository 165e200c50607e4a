"""Caption metrics on the COCO caption evaluation scale: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

The scores come from pycocoevalcap's own scorers (`Bleu(4)`, `Rouge`, `Cider`, the CIDEr-D variant), so they
are the reference numbers; COCO annotation and results files are indexed by pycocotools. The two backends
differ only where pycocoevalcap needs Java:
- "pycocoevalcap": Stanford PTBTokenizer (Java) and METEOR (Java; None when it fails).
- "python": no Java. `ptb_tokenize`, a pure-Python PTBTokenizer (the jar's tokens on caption text; its docstring
  says where they part), and METEOR None (it has no pure-Python equivalent). Same tokens, same BLEU/ROUGE-L/CIDEr-D.
"auto" picks pycocoevalcap when `java` is on PATH.

Not pycocoevalcap's `COCOEvalCap`: it needs Java, computes SPICE (whose CoreNLP jars it downloads on first
use, and this project runs offline) and prints progress to stdout, where the eval CLI writes its JSON.

Scale: BLEU, METEOR and ROUGE-L in 0..1; CIDEr-D unscaled (a paper's "CIDEr 113" is 1.13 here).
"""

from __future__ import annotations

import functools
import re
import shutil
import unicodedata
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

# ------------------------------------------------------------------------------------------------------------
# Tokenisation

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
}
# PTBLexer's abbreviations: the period stays on these wherever they stand (any case) ...
_ABBREVIATION = re.compile(
    r"jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri"  # months, days
    r"|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo"
    r"|inc|cos?|corp|pt[ye]s?|ltd|plc|rt|bancorp|dept|bhd|assn|univ|intl|sys|invt|elec|natl|mfg|mtg"  # companies
    r"|mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|lieut|hon|brig"
    r"|co?mdr|pfc|spc|supts?|det|m|mme|mlle|jr|sr|bros|ph\.d|ed\.d|esq|pres"  # titles
    r"|mt|st|ste|ave|blvd|rd|ft|bldg|tel|est|ext|sq|etc|al|seq|vs|cf|alex|wm|jos|cie|treas",
    re.IGNORECASE,
)
# ... on these only when capitalised (lower-case they are words: "ill.", "miss.") ...
_CAPITALISED_ABBREVIATIONS = {"ark", "del", "ill", "la", "mass", "miss", "ore", "pa", "tex", "wash"}
# ... and on these only before a number or a comma, colon or semicolon ("no. 5", "fig. 3").
_NUMBER_ABBREVIATION = re.compile(r"nos?|figs?|ca|art|op|pp|prop", re.IGNORECASE)
# Apostrophe-initial tokens PTB keeps whole; any other leading apostrophe is a quote ('hi' -> hi).
_APOSTROPHE_WORD = re.compile(r"'(s|m|d|ll|re|ve|em|cause|til|till|n|[2-9]0s)", re.IGNORECASE)
# Words with an inner apostrophe PTB keeps whole (o'clock, d'artagnan, ma'am); elsewhere it is a quote.
_INNER_APOSTROPHE = re.compile(r"[a-hj-xz]'[^\W\d_]{2,}|[^\W\d_]*[aeiouy]'[aeiou][^\W\d_]*", re.IGNORECASE)
# Non-ASCII characters PTBTokenizer rewrites; other symbols and these punctuation marks stand alone.
_CHARS = {
    "£": " # ",
    "€": " $ ",
    "¤": " $ ",
    "₠": " $ ",
    "¢": " cents ",
    "¼": " 1/4 ",
    "½": " 1/2 ",
    "¾": " 3/4 ",
    "⅓": " 1/3 ",
    "⅔": " 2/3 ",
    "’": "'",
    "\xad": "",  # soft hyphen
    **{c: " -- " for c in "‒–—―"},
    **{c: " `` " for c in "“‘‛«‹"},  # quotes, which pycocoevalcap then removes
    **{c: " '' " for c in "”»›"},
}
_OWN_TOKEN = set("¡§¶·¿‖‗†‡•‣‰‱′″‴‵‶‷‸※‾⁁⁂²³¹⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞‚„‟")
# Characters the jar's lexer does not know (punctuation, currency signs and number forms newer than its Unicode
# tables, emoji): deleted, leaving a token boundary.
_UNTOKENIZABLE = re.compile(
    "[\u2024-\u2027\u203c\u203d\u2043\u2045-\u205e\u20a1-\u20a3\u20a5-\u20bf\u2150-\u2152"
    "\u215f-\u2182\u2185-\u218b\U00010000-\U0010ffff]"
)
_NBSP = "\x00"


@functools.cache
def _rewrite_char(c: str) -> str:
    """One non-ASCII character as PTBTokenizer sees it."""
    if c in _CHARS:
        return _CHARS[c]
    category = unicodedata.category(c)
    if _UNTOKENIZABLE.fullmatch(c) or category in ("Cf", "Cn", "Nl"):
        return " "
    if category in ("Sm", "So", "Sk", "Sc") or c in _OWN_TOKEN:
        return f" {c} "
    return c


def _split_symbols(text: str) -> str:
    """Space out what PTB makes a token of its own: symbols, brackets and punctuation (not inside numbers)."""
    # "2 1/2" is one token, its space a no-break space (kept as _NBSP until the end, as str.split would split it)
    text = re.sub(r"(?<![\w.,:/-])(\d+) (\d+/\d+)", rf"\1{_NBSP}\2 ", text)
    if not text.isascii():
        text = "".join(map(_rewrite_char, text))
    # A signed number ends at its last digit ("-2nd" is "-2" "nd"; "2nd" is one word).
    text = re.sub(r"(?<!\S)(-\d+(?:\.\d+)?)(?=[^\s\d.,:])", r"\1 ", text)
    text = re.sub(r"[\"`]+", " '' ", text)  # quotes become `` and '' in PTB, which are then removed
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, f" {token} ")
    text = re.sub(r"(?<=\w)\.\.+(?=\w)", " ... ", text)  # a final "..." is the token's tail
    text = re.sub(r"--+", " -- ", text)
    text = re.sub(r"\*+|[=\\^|~%<>;]|[!?]+", lambda m: f" {m.group()} ", text)
    text = re.sub(r"\+(?!\d)", " + ", text)
    text = re.sub(r"(?<=\S)\+(?=\d)", " +", text)  # "+5" is a number
    text = re.sub(r"(?<![A-Z])&|&(?![A-Z])", " & ", text)  # AT&T stays whole
    text = re.sub(r"[A-Z]*\$", lambda m: f" {m.group()} ", text)  # US$ stays whole
    text = re.sub(r"(?<=[^\s#])#", " #", text)
    text = re.sub(r"#+(?=\d)|##+", lambda m: f"{m.group()} ", text)  # "#1" is two tokens, "#tag" one
    text = re.sub(r"(?<=\w)@(?!\w)", " @", text)
    text = re.sub(r"(?<![^\W_])/|/(?![^\W_])", " / ", text)  # "1/2" and "and/or" stay whole
    text = re.sub(r"(?<!\w)_(?=[^\W_])|(?<=[^\W_])_(?!\w)", " _ ", text)
    text = re.sub(r"[,:](?!\d)", lambda m: f" {m.group()} ", text)  # "1,000", "10:30" and ",5" stay whole
    return re.sub(r"(?<=[^\d\s])(?=[,:]\d)", " ", text)


def _split_apostrophes(text: str) -> str:
    text = re.sub(r"(?<=\w)(n't|'s|'m|'d|'ll|'re|'ve)\b", r" \1", text, flags=re.IGNORECASE)
    text = re.sub(r"(?<=\w)'n'(?=\w)", " 'n' ", text, flags=re.IGNORECASE)  # rock'n'roll
    text = re.sub(r"\b([yY]')(?=[^\W\d_])", r"\1 ", text)  # y'all
    return re.sub(r"(?i)(?<!\w)'t(?=is\b|was\b)", "'t ", text)  # 'tis


def _is_abbreviation(word: str, following: str) -> bool:
    """Whether PTB keeps the period after `word` ("mr" of "Mr.", "u.s" of "U.S.", "no" of "No. 5")."""
    return bool(
        _ABBREVIATION.fullmatch(word)
        or (word[:1].isupper() and word.lower() in _CAPITALISED_ABBREVIATIONS)
        or (
            _NUMBER_ABBREVIATION.fullmatch(word) and (following[:1].isdigit() or following in (",", ";", ":"))
        )
        or re.fullmatch(r"[^\W\d_](\.[^\W\d_])*", word)  # initials and acronyms: "j.", "a.m."
    )


def _strip_hyphens(word: str) -> str:
    return re.sub(r"^[-‐‑]+(?![.]?\d)|[-‐‑]+$", "", word)  # a number's minus sign stays


def _clean_word(token: str, following: str) -> str:
    """A whitespace-separated token without the hyphens, quotes and periods PTB splits off (and pycocoevalcap
    then removes); the apostrophes of 'em, '90s, o'clock and n't and an abbreviation's period stay."""
    if token.isalnum():
        return token  # most words: nothing to split off
    if token.lower() == "'n'" or token in _BRACKETS.values():
        return token
    if not token.strip("-"):
        return token  # pycocoevalcap removes "-" and "--"
    token = _strip_hyphens(re.sub(r"^\.+(?!\d)", "", token))
    if re.fullmatch(r"['`]*y'", token, flags=re.IGNORECASE):  # y'all
        return token.lstrip("'`")
    core = token.rstrip(".'`")
    if not _APOSTROPHE_WORD.fullmatch(core) and core != "'t":
        core = core.lstrip("'`")
    if token[len(token.rstrip(".'`")) :].startswith(".") and core and _is_abbreviation(core, following):
        core += "."
    if "'" in core.strip("'") and not (core.lower().endswith("n't") or _INNER_APOSTROPHE.fullmatch(core)):
        return " ".join(_strip_hyphens(piece) for piece in core.split("'"))  # jack-o'-lantern
    return core


def ptb_tokenize(text: str) -> str:
    """`PTBTokenizer -lowerCase` (pycocoevalcap's jar) + pycocoevalcap's punctuation removal, as space-joined
    tokens, without Java. The same tokens on caption text: words in any script and case, numbers (1,000 3.5
    -5 10:30 $5 50% #1 1/2), contractions, possessives and quotes, hyphens and dashes, PTB's abbreviations,
    brackets, symbols and emoji; tests/eval/test_caption_metrics.py holds it to the jar on ~900 captions. It
    differs on URLs, emoticons, C++/C#, SGML tags, CJK and full-width punctuation, runs of mixed quote marks and
    a few rarer PTB rules (tests/eval/tricky_captions.py, PTB_DIFFERENCES).
    """
    words = _split_apostrophes(_split_symbols(" ".join(text.splitlines()))).split()
    tokens = []
    for i, token in enumerate(words):
        for word in _clean_word(token, words[i + 1] if i + 1 < len(words) else "").split():
            tokens.extend(_SPLIT_WORDS.get(word.lower(), word.lower()).split())
    # pycocoevalcap drops its PUNCTUATIONS after lower-casing, so bracket tokens ("-lrb-") survive, as here.
    return " ".join(t for t in tokens if t not in PUNCTUATIONS).replace(_NBSP, "\xa0")


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
