"""The shapes world: a tiny, seeded visual world written in the project's production formats.

A scene holds 1-3 objects, each with a colour, a shape, a size and a cell of a 3x3 grid (one object per cell,
so objects never overlap). Relations (left of, right of, above, below) follow from the cells. One set of phrase
generators (`describe`, `facts`) writes everything the world says about a scene, so the text corpus, the
HellaSwag questions and the image captions share one vocabulary and the pretrained LM helps the captioner:

    out_dir/text/shapes_val_000000.npy, shapes_train_000001.npy ...  uint16 token shards (EOT-prefixed docs)
    out_dir/hellaswag/shapes_val.jsonl                               HellaSwag format (+ the scene per row)
    out_dir/images/{train,val}/{image_id:08d}.png                    rendered scenes
    out_dir/images/annotations/captions_{train,val}.json             COCO captions format
    out_dir/images/annotations/scenes_{train,val}.json               {image_id: scene dict}

Everything is a pure function of the seed: each output draws from its own `random.Random` stream, so a file
regenerated after being deleted is byte-identical to the original, and existing files are never rewritten.
English is lower case throughout, to keep the world's vocabulary small for a tiny model.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioner.io import atomic_path, save_json, save_text
from captioner.tokenizer import EOT, gpt2_encoding

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")

RGB = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 220),
    "orange": (250, 140, 20),
}
BACKGROUND = (28, 28, 32)
GRID = 3
# Object radius as a fraction of a grid cell's side. Large objects nearly fill their cell; the margin keeps
# neighbours apart even after the jitter, so objects never touch.
RADIUS = {"small": 0.27, "large": 0.44}
MARGIN = 0.04

# Words the world's English uses for each attribute; the first spelling is canonical (facts, questions).
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
POSITIONS = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
STYLES = ("list", "image", "count", "there", "position", "relation")
QUESTION_KINDS = ("color", "shape", "size_color", "count", "relation")
PREFIX = "shapes"  # token shard names: shapes_{val,train}_NNNNNN.npy
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# the world


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int  # grid cell, 0 = top
    col: int  # grid cell, 0 = left
    x: float  # centre, as a fraction of the image width (0 = left edge)
    y: float  # centre, as a fraction of the image height (0 = top edge)

    def __post_init__(self):
        for name, allowed in (("color", COLORS), ("shape", SHAPES), ("size", SIZES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"object {name} {getattr(self, name)!r} is not one of {allowed}")
        for name in ("row", "col"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < GRID:
                raise ValueError(f"object {name} {value!r} is not a grid index in 0..{GRID - 1}")
        for name in ("x", "y"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"object {name} {getattr(self, name)!r} is outside [0, 1]")

    @property
    def cell(self) -> tuple[int, int]:
        return self.row, self.col


@dataclass(frozen=True)
class Scene:
    objects: list[Obj]

    def __post_init__(self):
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects share a grid cell (they would overlap): cells {cells}")

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        if not isinstance(d, dict) or not isinstance(d.get("objects"), list):
            raise ValueError(f"scene must be a dict with an 'objects' list, got {d!r}")
        fields = ("color", "shape", "size", "row", "col", "x", "y")
        objects = []
        for i, o in enumerate(d["objects"]):
            missing = [f for f in fields if f not in o]
            if missing:
                raise ValueError(f"scene object {i} is missing keys {missing}: {o!r}")
            objects.append(Obj(**{f: o[f] for f in fields}))
        return cls(objects)


def relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    """Whether `a <relation> b`, judged by grid cells (y grows downwards)."""
    if relation == "to the left of":
        return a.col < b.col
    if relation == "to the right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def sample_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    """A random scene: 1..max_objects objects in distinct grid cells, jittered inside their cell.

    `rng` is a `random.Random` (fast scalar draws, and stable across Python versions for a given seed).
    Objects are listed in reading order (top-left first).
    """
    n = rng.randint(1, max_objects)
    objects = []
    for cell in sorted(rng.sample(range(GRID * GRID), n)):
        row, col = divmod(cell, GRID)
        color, shape, size = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(SIZES)
        slack = 0.5 - RADIUS[size] - MARGIN  # how far the centre may move without leaving the cell
        x = (col + 0.5 + rng.uniform(-slack, slack)) / GRID
        y = (row + 0.5 + rng.uniform(-slack, slack)) / GRID
        objects.append(Obj(color, shape, size, row, col, round(x, 4), round(y, 4)))
    return Scene(objects)


# ----------------------------------------------------------------------------------------------------------
# phrases: the one place that turns scenes into English (corpus, captions and questions all come from here)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else noun + "s"


def noun_phrase(obj: Obj, rng: random.Random, *, sizes: bool) -> str:
    """An indefinite mention of one object: "a small red circle", "an orange star"."""
    words = [rng.choice(SIZE_WORDS[obj.size])] if sizes else []
    words += [obj.color, obj.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _group_phrases(scene: Scene, rng: random.Random, *, sizes: bool) -> list[str]:
    """One phrase per distinct (colour, shape): "a red circle", or "two small red circles" for repeats."""
    groups: dict[tuple[str, str], list[Obj]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.color, obj.shape), []).append(obj)
    phrases = []
    for (color, shape), objs in groups.items():
        if len(objs) == 1:
            phrases.append(noun_phrase(objs[0], rng, sizes=sizes))
        else:
            same_size = len({o.size for o in objs}) == 1
            size = [rng.choice(SIZE_WORDS[objs[0].size])] if sizes and same_size else []
            phrases.append(" ".join([NUMBER_WORDS[len(objs)], *size, color, shape + "s"]))
    rng.shuffle(phrases)
    return phrases


def describe(scene: Scene, rng: random.Random, style: str | None = None, *, sizes: bool | None = None) -> str:
    """One sentence, true of `scene`, that mentions every object exactly once (a caption / a document intro).

    style: "list" | "image" | "count" | "there" | "position" | "relation" (None: random). Only "count" states
    the number of objects and only "position" places every object; "relation" relates one pair and places the
    third object (with one object it falls back to "position"). sizes: name sizes (None: random).
    """
    style = style or rng.choice(STYLES)
    if sizes is None:
        sizes = rng.random() < 0.5
    if style == "relation" and len(scene.objects) == 1:
        style = "position"
    if style == "position":
        objs = rng.sample(scene.objects, len(scene.objects))
        items = _join([f"{noun_phrase(o, rng, sizes=sizes)} {POSITIONS[o.cell]}" for o in objs])
        return rng.choice(("{}.", "there is {}.", "an image with {}.")).format(items)
    if style == "relation":
        a, b, *rest = rng.sample(scene.objects, len(scene.objects))
        relation = rng.choice([r for r in RELATIONS if relation_holds(a, b, r)])
        verb = rng.choice((" is", ""))
        text = f"{noun_phrase(a, rng, sizes=sizes)}{verb} {relation} {noun_phrase(b, rng, sizes=sizes)}"
        for c in rest:
            text += f", and {noun_phrase(c, rng, sizes=sizes)}{verb} {POSITIONS[c.cell]}"
        return text + "."

    items = _join(_group_phrases(scene, rng, sizes=sizes))
    if style == "list":
        return f"{items}."
    if style == "image":
        templates = (
            "an image of {}.",
            "a picture of {}.",
            "a dark background with {}.",
            "{} on a dark background.",
        )
        return rng.choice(templates).format(items)
    if style == "there":
        return f"there {'are' if items.split()[0] in NUMBER_WORDS else 'is'} {items}."
    if style == "count":
        n = len(scene.objects)
        counted = f"{NUMBER_WORDS[n]} {_plural(n, rng.choice(('object', 'shape')))}"
        templates = (
            f"there {'is' if n == 1 else 'are'} {{}}: {{}}.",
            "an image with {}: {}.",
            "{} on a dark background: {}.",
        )
        return rng.choice(templates).format(counted, items)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def reference(obj: Obj, scene: Scene, *, color: bool = True, size: bool = True) -> str | None:
    """The shortest definite description that picks `obj` out of `scene` ("the square", "the small red
    square"), using colour / size only where allowed; None when no allowed description is unique."""
    combos = [(False, False), (True, False), (False, True), (True, True)]  # (use size, use colour)
    for use_size, use_color in combos:
        if (use_size and not size) or (use_color and not color):
            continue
        same = [
            o
            for o in scene.objects
            if o.shape == obj.shape
            and (not use_size or o.size == obj.size)
            and (not use_color or o.color == obj.color)
        ]
        if len(same) == 1:
            words = ([obj.size] if use_size else []) + ([obj.color] if use_color else [])
            return " ".join(["the", *words, obj.shape])
    return None


def _unique_color(obj: Obj, scene: Scene) -> bool:
    return sum(o.color == obj.color for o in scene.objects) == 1


def facts(scene: Scene, *, sizes: bool, positions: bool) -> list[str]:
    """Every true one-sentence claim about `scene` that a reader of its description could derive.

    sizes / positions: whether the description named sizes / placed every object; facts needing them are
    left out otherwise. The forms are exactly those `claim_holds` parses and the HellaSwag questions ask.
    """
    n = len(scene.objects)
    out = [
        f"the number of objects in the image is {NUMBER_WORDS[n]}.",
        f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {_plural(n, 'object')}.",
    ]
    for obj in scene.objects:
        if ref := reference(obj, scene, color=False, size=sizes):
            out.append(f"{ref} is {obj.color}.")
            if sizes:
                out.append(f"{ref} is {obj.size} and {obj.color}.")
        if sizes and (ref := reference(obj, scene, size=False)):
            out.append(f"{ref} is {obj.size}.")
        if _unique_color(obj, scene):
            out.append(f"the {obj.color} object is a {obj.shape}.")
        if positions and (ref := reference(obj, scene, size=sizes)):
            out.append(f"{ref} is {POSITIONS[obj.cell]}.")
    if positions:
        for a in scene.objects:
            for b in scene.objects:
                ref_a, ref_b = reference(a, scene, size=sizes), reference(b, scene, size=sizes)
                if a is b or ref_a is None or ref_b is None:
                    continue
                out += [f"{ref_a} is {r} {ref_b}." for r in RELATIONS if relation_holds(a, b, r)]
    return out


def document(scene: Scene, rng: random.Random) -> str:
    """A text-corpus document: a description of the scene followed by a few facts derivable from it."""
    style, sizes = rng.choice(STYLES), rng.random() < 0.5
    intro = describe(scene, rng, style, sizes=sizes)
    pool = facts(scene, sizes=sizes, positions=style == "position")
    return " ".join([intro, *rng.sample(pool, rng.randint(1, min(5, len(pool))))])


def captions_for(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """`n` distinct true captions, cycling through the description styles so they differ in form."""
    captions: list[str] = []
    styles: list[str] = []
    for _ in range(100 * n):
        if len(captions) == n:
            return captions
        if not styles:
            styles = rng.sample(STYLES, len(STYLES))
        caption = describe(scene, rng, styles.pop())
        if caption not in captions:
            captions.append(caption)
    raise RuntimeError(f"could not write {n} distinct captions for scene {scene.to_dict()}")


# ----------------------------------------------------------------------------------------------------------
# HellaSwag-format questions


def _pick(correct: str, pool: list[str], preferred: list[str], rng: random.Random, k: int = 3) -> list[str]:
    """`k` distractors != correct, taking ones present in the scene first (harder: attribute binding)."""
    preferred = [p for p in dict.fromkeys(preferred) if p != correct]
    rest = [p for p in pool if p != correct and p not in preferred]
    rng.shuffle(preferred)
    rng.shuffle(rest)
    return (preferred + rest)[:k]


def question(scene: Scene, rng: random.Random, kind: str) -> tuple[str, str, str, list[str]] | None:
    """(context, stem, right ending, 3 wrong endings) about `scene`, or None if it cannot ask `kind`.

    The context describes the scene; the stem starts a claim ("the square is"); exactly one ending makes the
    claim true. Wrong endings share the right one's template and differ in one attribute.
    """
    objs = rng.sample(scene.objects, len(scene.objects))
    if kind in ("color", "size_color"):
        sizes = kind == "size_color" or rng.random() < 0.5
        targets = [
            (o, ref)
            for o in objs
            if (ref := reference(o, scene, color=False, size=kind == "color" and sizes))
        ]
        if not targets:
            return None
        obj, ref = targets[0]
        context = describe(scene, rng, rng.choice(("list", "image", "there", "count")), sizes=sizes)
        others = _pick(obj.color, list(COLORS), [o.color for o in scene.objects], rng)
        if kind == "color":
            return context, f"{ref} is", f"{obj.color}.", [f"{c}." for c in others]
        other_size = next(s for s in SIZES if s != obj.size)
        wrong = [
            f"{other_size} and {obj.color}.",
            f"{obj.size} and {others[0]}.",
            f"{other_size} and {others[0]}.",
        ]
        return context, f"{ref} is", f"{obj.size} and {obj.color}.", wrong
    if kind == "shape":
        targets = [o for o in objs if _unique_color(o, scene)]
        if not targets:
            return None
        obj = targets[0]
        context = describe(scene, rng, rng.choice(("list", "image", "there", "count")))
        others = _pick(obj.shape, list(SHAPES), [o.shape for o in scene.objects], rng)
        return context, f"the {obj.color} object is a", f"{obj.shape}.", [f"{s}." for s in others]
    if kind == "count":
        n = len(scene.objects)
        context = describe(scene, rng, rng.choice(("list", "image", "there", "position")))
        others = _pick(NUMBER_WORDS[n], list(NUMBER_WORDS[1:6]), [], rng)
        return (
            context,
            "the number of objects in the image is",
            f"{NUMBER_WORDS[n]}.",
            [f"{w}." for w in others],
        )
    if kind == "relation":
        sizes = rng.random() < 0.5
        # Only pairs sharing a row or a column: then exactly one of the four relations holds.
        pairs = [(a, b) for a in objs for b in objs if a is not b and (a.row == b.row or a.col == b.col)]
        pairs = [
            (a, b, ra, rb)
            for a, b in pairs
            if (ra := reference(a, scene, size=sizes)) and (rb := reference(b, scene, size=sizes))
        ]
        if not pairs:
            return None
        a, b, ref_a, ref_b = pairs[0]
        context = describe(scene, rng, "position", sizes=sizes)
        endings = [f"{r} {ref_b}." for r in RELATIONS]
        right = next(e for r, e in zip(RELATIONS, endings) if relation_holds(a, b, r))
        return context, f"{ref_a} is", right, [e for e in endings if e != right]
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


def hellaswag_rows(rng: random.Random, n: int) -> list[dict]:
    """`n` HellaSwag-format rows (rowanz/hellaswag keys, plus "scene"), kinds in rotation, labels uniform."""
    rows = []
    for ind in range(n):
        kind = QUESTION_KINDS[ind % len(QUESTION_KINDS)]
        q = None
        while q is None:  # not every scene can ask every kind (e.g. a relation needs an aligned pair)
            scene = sample_scene(rng)
            q = question(scene, rng, kind)
        context, stem, right, wrong = q
        endings = [right, *wrong]
        rng.shuffle(endings)
        rows.append(
            {
                "ind": ind,
                "activity_label": f"shapes {kind}",
                "ctx_a": context,
                "ctx_b": stem,
                "ctx": f"{context} {stem}",
                "split": "val",
                "split_type": "indomain",
                "label": endings.index(right),
                "endings": endings,
                "source_id": "shapes",
                "scene": scene.to_dict(),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# reading the world's English back: caption checking (object accuracy) and claim checking

_WORD = re.compile(r"[a-z0-9]+")
_SHAPE_NOUNS = {s: (s, False) for s in SHAPES} | {s + "s": (s, True) for s in SHAPES}
_GENERIC_NOUNS = {w: w.endswith("s") for w in ("object", "objects", "shape", "shapes", "thing", "things")}
_SIZE_OF = {word: size for size, words in SIZE_WORDS.items() for word in words}
_NUMBER_OF = {w: i for i, w in enumerate(NUMBER_WORDS)}
_CELL_OF = {phrase: cell for cell, phrase in POSITIONS.items()}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _noun_phrase_before(words: list[str], i: int) -> tuple[str | None, set[str], str | None]:
    """Modifiers of the noun at words[i]: (colour, sizes, determiner) read backwards over colour/size words.

    The determiner is "a"/"an", a number word or digits, "the", or None. Two colours ("a red blue circle")
    give colour "?" so the mention can never match a scene.
    """
    color, sizes, j = None, set(), i - 1
    while j >= 0 and (words[j] in COLORS or words[j] in _SIZE_OF):
        if words[j] in COLORS:
            color = words[j] if color is None else "?"
        else:
            sizes.add(_SIZE_OF[words[j]])
        j -= 1
    det = (
        words[j]
        if j >= 0 and (words[j] in ("a", "an", "the") or words[j] in _NUMBER_OF or words[j].isdigit())
        else None
    )
    return color, sizes, det


def _count(det: str | None, plural: bool) -> int | None:
    """How many things an indefinite noun phrase introduces; None when its form does not say."""
    if det in ("a", "an"):
        return None if plural else 1
    if det is not None and det.isdigit():
        return int(det)
    if det in _NUMBER_OF:
        return _NUMBER_OF[det]
    return None if plural else 1  # a bare singular ("red circle") still names one object


def caption_matches_scene(caption: str, scene: Scene | dict) -> bool:
    """Whether a caption names exactly the scene's objects. What is checked, and only this:

    1. Indefinite mentions of shapes ("a red circle", "two blue squares", "3 green stars", a bare "red
       circle") form a multiset of (colour, shape); it must equal the scene's. A mention without a colour,
       with two colours, or a plural without a count ("red circles") never matches.
    2. Stated totals ("two objects", "three shapes") must equal the number of objects in the scene.
    3. Definite mentions ("the circle", "the blue square", "the red object") must name something mentioned
       in (1); they add nothing to the multiset.
    Sizes, positions and relations are not checked.
    """
    scene = scene if isinstance(scene, Scene) else Scene.from_dict(scene)
    words = _words(caption)
    mentioned: Counter[tuple[str | None, str]] = Counter()
    totals, definite = [], []
    for i, word in enumerate(words):
        if word in _SHAPE_NOUNS:
            shape, plural = _SHAPE_NOUNS[word]
            color, _, det = _noun_phrase_before(words, i)
            if det == "the":
                definite.append((color, shape))
                continue
            n = _count(det, plural)
            if n is None:
                return False
            mentioned[(color, shape)] += n
        elif word in _GENERIC_NOUNS:
            color, _, det = _noun_phrase_before(words, i)
            if det == "the" and color is not None:
                definite.append((color, None))
            elif det is not None and det not in ("a", "an", "the"):
                totals.append(_count(det, _GENERIC_NOUNS[word]))
    truth = Counter((o.color, o.shape) for o in scene.objects)
    if mentioned != truth or any(t != len(scene.objects) for t in totals):
        return False
    return all(
        any((c is None or c == color) and (s is None or s == shape) for color, shape in mentioned)
        for c, s in definite
    )


def object_accuracy(captions: dict[int, str], scenes: dict[int, Scene | dict]) -> float:
    """Fraction of `captions` ({image_id: caption}) for which `caption_matches_scene` holds."""
    if not captions:
        raise ValueError("object_accuracy: no captions to score")
    hits = 0
    for image_id, caption in captions.items():
        scene = scenes.get(image_id, scenes.get(str(image_id)))
        if scene is None:
            raise KeyError(f"object_accuracy: no scene for image_id {image_id!r}")
        hits += caption_matches_scene(caption, scene)
    return hits / len(captions)


def _resolve(words: list[str], i: int, scene: Scene, sentence: str) -> tuple[Obj, int]:
    """Read "the [size] [colour] (shape | object)" at words[i:]; the one object it names and the next index."""
    if i >= len(words) or words[i] != "the":
        raise ValueError(f"claim {sentence!r}: expected a reference starting with 'the' at word {i}")
    j = i + 1
    size = color = None
    while j < len(words) and (words[j] in _SIZE_OF or words[j] in COLORS):
        size, color = (_SIZE_OF[words[j]], color) if words[j] in _SIZE_OF else (size, words[j])
        j += 1
    if j >= len(words) or not (words[j] in SHAPES or words[j] == "object"):
        raise ValueError(f"claim {sentence!r}: reference at word {i} has no shape or 'object'")
    shape = words[j] if words[j] in SHAPES else None
    found = [
        o
        for o in scene.objects
        if (shape is None or o.shape == shape)
        and (size is None or o.size == size)
        and (color is None or o.color == color)
    ]
    if len(found) != 1:
        raise ValueError(
            f"claim {sentence!r}: {' '.join(words[i : j + 1])!r} names {len(found)} objects, not 1"
        )
    return found[0], j + 1


def claim_holds(scene: Scene | dict, sentence: str) -> bool:
    """Whether one claim sentence (the forms `facts` writes and HellaSwag asks) is true of `scene`.

    Forms: "the number of objects in the image is N", "there is/are N object(s)", and
    REF "is" PRED with REF = "the [size] [colour] (shape | object)" naming one object, and PRED one of
    COLOUR | SIZE | SIZE "and" COLOUR | "a [size] [colour] SHAPE" | RELATION REF | POSITION.
    Raises ValueError for anything else (including a REF that does not name exactly one object).
    """
    scene = scene if isinstance(scene, Scene) else Scene.from_dict(scene)
    words, n = _words(sentence), len(scene.objects)
    if words[:4] == ["the", "number", "of", "objects"] and words[-2:-1] == ["is"] and words[-1] in _NUMBER_OF:
        return _NUMBER_OF[words[-1]] == n
    if len(words) == 4 and words[0] == "there" and words[1] in ("is", "are") and words[3] in _GENERIC_NOUNS:
        if words[2] not in _NUMBER_OF:
            raise ValueError(f"claim {sentence!r}: {words[2]!r} is not a number word")
        return _NUMBER_OF[words[2]] == n
    obj, i = _resolve(words, 0, scene, sentence)
    if words[i : i + 1] != ["is"]:
        raise ValueError(f"claim {sentence!r}: expected 'is' after the reference")
    pred = words[i + 1 :]
    if len(pred) == 1 and pred[0] in COLORS:
        return obj.color == pred[0]
    if len(pred) == 1 and pred[0] in _SIZE_OF:
        return obj.size == _SIZE_OF[pred[0]]
    if len(pred) == 3 and pred[0] in _SIZE_OF and pred[1] == "and" and pred[2] in COLORS:
        return obj.size == _SIZE_OF[pred[0]] and obj.color == pred[2]
    if " ".join(pred) in _CELL_OF:
        return obj.cell == _CELL_OF[" ".join(pred)]
    if pred and pred[0] in ("a", "an") and pred[-1] in SHAPES:
        attrs = pred[1:-1]
        if not all(w in COLORS or w in _SIZE_OF for w in attrs):
            raise ValueError(f"claim {sentence!r}: unexpected words {attrs} before the shape")
        return obj.shape == pred[-1] and all(
            obj.color == w if w in COLORS else obj.size == _SIZE_OF[w] for w in attrs
        )
    for relation in RELATIONS:
        rel = relation.split()
        if pred[: len(rel)] == rel:
            other, end = _resolve(pred, len(rel), scene, sentence)
            if end != len(pred):
                raise ValueError(f"claim {sentence!r}: trailing words {pred[end:]}")
            return relation_holds(obj, other, relation)
    raise ValueError(f"claim {sentence!r}: cannot parse the predicate {' '.join(pred)!r}")


# ----------------------------------------------------------------------------------------------------------
# rendering


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape of radius r centred at (cx, cy), in pixels (y down)."""
    if shape == "square":
        h = 0.82 * r  # about a circle's area
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":  # taller than wide, so it never reads as a rotated square
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "triangle":  # pointing up; centred on its bounding box rather than its centroid
        R = 1.15 * r
        return [
            (cx + R * math.cos(a), cy + 0.25 * R + R * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":  # five points, outer radius r, inner 0.48 r
        return [
            (cx + rr * math.cos(a), cy + rr * math.sin(a))
            for k in range(10)
            for rr, a in [((r if k % 2 == 0 else 0.48 * r), -math.pi / 2 + k * math.pi / 5)]
        ]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_center_px(obj: Obj, image_size: int) -> tuple[int, int]:
    """The (x, y) pixel containing the object's centre in an `image_size` render."""
    return int(obj.x * image_size), int(obj.y * image_size)


def render_scene(scene: Scene, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """RGB image of `scene`: drawn at `supersample`x then box-downsampled, which antialiases the edges while
    interior pixels keep the exact colour."""
    big = image_size * supersample
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, r = obj.x * big, obj.y * big, RADIUS[obj.size] * big / GRID
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=RGB[obj.color])
        else:
            draw.polygon(_outline(obj.shape, cx, cy, r), fill=RGB[obj.color])
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------------------------
# writers


def _rng(seed: int, stream: str) -> random.Random:
    """An independent random stream per output, so each file depends only on (seed, stream)."""
    return random.Random(f"shapes:{seed}:{stream}")


def corpus_tokens(rng: random.Random, n_tokens: int, batch: int = 4096) -> np.ndarray:
    """Exactly `n_tokens` GPT-2 tokens of EOT-prefixed documents about random scenes (the last one cut)."""
    enc = gpt2_encoding()
    eot = enc.decode([EOT])
    chunks, total = [], 0
    while total < n_tokens:
        # One encode call per batch: tiktoken splits at the special token first and encodes the pieces
        # between independently, so this equals per-document encoding at a fraction of the call overhead.
        text = "".join(eot + document(sample_scene(rng), rng) for _ in range(batch))
        chunks.append(np.array(enc.encode(text, allowed_special={eot}), dtype=np.uint16))
        total += len(chunks[-1])
    return np.concatenate(chunks)[:n_tokens]


def write_text_shards(
    out_dir: str | Path, *, seed: int, split: str, n_tokens: int, shard_size: int | None = None
) -> list[Path]:
    """Token shards for `split`: val is one shard, index 0; train is shards 1.. of `shard_size` tokens."""
    # Lazy: the shards module also holds the Lightning DataModule, whose import costs seconds.
    from captioner.data.shards import shard_path, write_shard

    if split == "val":
        paths = [shard_path(out_dir, PREFIX, "val", 0)]
        shard_size = n_tokens
    else:
        shard_size = shard_size or n_tokens
        paths = [shard_path(out_dir, PREFIX, split, k + 1) for k in range(math.ceil(n_tokens / shard_size))]
    if all(p.exists() for p in paths):
        return paths
    tokens = corpus_tokens(_rng(seed, f"text/{split}"), n_tokens)
    for k, path in enumerate(paths):
        if not path.exists():
            write_shard(path, tokens[k * shard_size : (k + 1) * shard_size])
    return paths


def write_hellaswag(path: str | Path, *, seed: int, n: int) -> Path:
    path = Path(path)
    if not path.exists():
        rows = hellaswag_rows(_rng(seed, "hellaswag"), n)
        save_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_images(
    root: str | Path,
    split: str,
    *,
    seed: int,
    first_id: int,
    n: int,
    image_size: int,
    captions_per_image: int,
) -> tuple[Path, Path]:
    """Render `n` scenes into root/split/ and write COCO captions + scenes json; ids first_id .. first_id+n-1.

    Annotation ids are image_id * 100 + k, unique across splits as long as image ids are.
    """
    root = Path(root)
    rng = _rng(seed, f"images/{split}")
    scenes, captions = {}, {}
    for image_id in range(first_id, first_id + n):
        scenes[image_id] = sample_scene(rng)
        captions[image_id] = captions_for(scenes[image_id], rng, captions_per_image)
    for image_id, scene in scenes.items():
        dest = root / split / f"{image_id:08d}.png"
        if not dest.exists():
            with atomic_path(dest) as tmp:
                render_scene(scene, image_size).save(tmp, format="PNG")
    captions_file = root / "annotations" / f"captions_{split}.json"
    if not captions_file.exists():
        coco = {
            "info": {
                "description": f"shapes world, {split} split",
                "version": str(FORMAT_VERSION),
                "seed": seed,
            },
            "licenses": [],
            "images": [
                {"id": i, "file_name": f"{i:08d}.png", "width": image_size, "height": image_size}
                for i in scenes
            ],
            "annotations": [
                {"id": (i - 1) * captions_per_image + k + 1, "image_id": i, "caption": c}
                for i, caps in captions.items()
                for k, c in enumerate(caps)
            ],
        }
        save_json(captions_file, coco)
    scenes_file = root / "annotations" / f"scenes_{split}.json"
    if not scenes_file.exists():
        save_json(scenes_file, {str(i): s.to_dict() for i, s in scenes.items()})
    return captions_file, scenes_file


def load_scenes(path: str | Path) -> dict[int, Scene]:
    """Read a scenes_{split}.json written by `prepare_shapes` into {image_id: Scene}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"scenes file not found: {path} (run `captioner-prepare shapes`)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object {{image_id: scene}}, got {type(raw).__name__}")
    scenes = {}
    for key, value in raw.items():
        try:
            scenes[int(key)] = Scene.from_dict(value)
        except ValueError as err:
            raise ValueError(f"{path}: image_id {key!r}: {err}") from None
    return scenes


def prepare_shapes(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_tokens: int = 3_000_000,
    val_tokens: int = 100_000,
    n_train_images: int = 4000,
    n_val_images: int = 200,
    n_hellaswag: int = 500,
    image_size: int = 64,
    captions_per_image: int = 5,
    shard_size: int | None = None,
) -> dict[str, Path]:
    """Generate the whole shapes world under `out_dir` (layout in the module docstring); returns its paths.

    Idempotent: outputs that exist are kept, missing ones are regenerated identically. `out_dir/manifest.json`
    records the arguments; asking for different ones in the same directory is an error rather than a silent
    mix of two worlds.
    """
    params = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "n_train_images": n_train_images,
        "n_val_images": n_val_images,
        "n_hellaswag": n_hellaswag,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "shard_size": shard_size,
    }
    for key, value in params.items():
        if key != "shard_size" and (not isinstance(value, int) or value < (0 if key == "seed" else 1)):
            raise ValueError(f"prepare_shapes: {key} must be a positive integer, got {value!r}")
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise ValueError(f"prepare_shapes: shard_size must be a positive integer or None, got {shard_size!r}")
    if image_size < 16:
        raise ValueError(f"prepare_shapes: image_size {image_size} is too small to draw shapes (min 16)")

    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old != params:
            changed = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
            raise ValueError(
                f"{manifest}: this directory holds a shapes world made with other arguments (old, new): {changed}; "
                "use another out_dir or delete this one"
            )
    else:
        save_json(manifest, params, indent=2)

    text = out_dir / "text"
    write_text_shards(text, seed=seed, split="val", n_tokens=val_tokens)
    write_text_shards(text, seed=seed, split="train", n_tokens=train_tokens, shard_size=shard_size)
    hellaswag = write_hellaswag(out_dir / "hellaswag" / "shapes_val.jsonl", seed=seed, n=n_hellaswag)
    images = out_dir / "images"
    common = {"seed": seed, "image_size": image_size, "captions_per_image": captions_per_image}
    captions_train, scenes_train = write_images(images, "train", first_id=1, n=n_train_images, **common)
    captions_val, scenes_val = write_images(
        images, "val", first_id=n_train_images + 1, n=n_val_images, **common
    )
    return {
        "text": text,
        "hellaswag": hellaswag,
        "images": images,
        "captions_train": captions_train,
        "captions_val": captions_val,
        "scenes_train": scenes_train,
        "scenes_val": scenes_val,
    }
