"""The world's English: its vocabulary, and every sentence it writes about a scene.

One set of phrase generators (`describe`, `facts`) writes the text corpus, the image captions and the
HellaSwag-format questions, so all three share one vocabulary and the pretrained LM helps the captioner.
English is lower case throughout, to keep the world's vocabulary small for a tiny model.
"""

from __future__ import annotations

import random
import re

from captioner.errors import UserError
from captioner.shapes.world import (
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    relation_holds,
    sample_scene,
)

# Words the world's English uses for each attribute; the first spelling is canonical (facts, questions).
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
STYLES = ("list", "image", "count", "there", "position", "relation")
QUESTION_KINDS = ("color", "shape", "size_color", "count", "relation")

# The way back from words to the world, shared by the readers (`accuracy`, the tests' claim reader) so that a
# word the writers gain is understood everywhere.
SIZE_OF = {word: size for size, spellings in SIZE_WORDS.items() for word in spellings}
NUMBER_OF = {w: i for i, w in enumerate(NUMBER_WORDS)}
# Nouns that count objects without naming a shape ("two objects"): {noun: whether it is plural}.
GENERIC_NOUNS = {w: w.endswith("s") for w in ("object", "objects", "shape", "shapes", "thing", "things")}
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """The lower-cased words and numbers of `text`, punctuation dropped."""
    return _WORD.findall(text.lower())


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
    raise UserError(f"unknown style {style!r}; expected one of {STYLES}")


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
    raise UserError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


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
