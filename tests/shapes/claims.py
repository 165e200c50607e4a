"""Reading claims back: whether a sentence in the forms `text.facts` writes and the questions ask is true.

The generator's check on itself: the tests require every fact, and exactly one ending of each question, to
hold. A sentence it cannot read is the generator's bug, so a plain ValueError.
"""

from __future__ import annotations

from captioner.shapes.text import GENERIC_NOUNS, NUMBER_OF, SIZE_OF, split_words
from captioner.shapes.world import COLORS, POSITIONS, RELATIONS, SHAPES, Obj, Scene, relation_holds

_CELL_OF = {phrase: cell for cell, phrase in POSITIONS.items()}


def _resolve(words: list[str], i: int, scene: Scene, sentence: str) -> tuple[Obj, int]:
    """Read "the [size] [colour] (shape | object)" at words[i:]; the one object it names and the next index."""
    if i >= len(words) or words[i] != "the":
        raise ValueError(f"claim {sentence!r}: expected a reference starting with 'the' at word {i}")
    j = i + 1
    size = color = None
    while j < len(words) and (words[j] in SIZE_OF or words[j] in COLORS):
        size, color = (SIZE_OF[words[j]], color) if words[j] in SIZE_OF else (size, words[j])
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
    words, n = split_words(sentence), len(scene.objects)
    if words[:4] == ["the", "number", "of", "objects"] and words[-2:-1] == ["is"] and words[-1] in NUMBER_OF:
        return NUMBER_OF[words[-1]] == n
    if len(words) == 4 and words[0] == "there" and words[1] in ("is", "are") and words[3] in GENERIC_NOUNS:
        if words[2] not in NUMBER_OF:
            raise ValueError(f"claim {sentence!r}: {words[2]!r} is not a number word")
        return NUMBER_OF[words[2]] == n
    obj, i = _resolve(words, 0, scene, sentence)
    if words[i : i + 1] != ["is"]:
        raise ValueError(f"claim {sentence!r}: expected 'is' after the reference")
    pred = words[i + 1 :]
    if len(pred) == 1 and pred[0] in COLORS:
        return obj.color == pred[0]
    if len(pred) == 1 and pred[0] in SIZE_OF:
        return obj.size == SIZE_OF[pred[0]]
    if len(pred) == 3 and pred[0] in SIZE_OF and pred[1] == "and" and pred[2] in COLORS:
        return obj.size == SIZE_OF[pred[0]] and obj.color == pred[2]
    if " ".join(pred) in _CELL_OF:
        return obj.cell == _CELL_OF[" ".join(pred)]
    if pred and pred[0] in ("a", "an") and pred[-1] in SHAPES:
        attrs = pred[1:-1]
        if not all(w in COLORS or w in SIZE_OF for w in attrs):
            raise ValueError(f"claim {sentence!r}: unexpected words {attrs} before the shape")
        return obj.shape == pred[-1] and all(
            obj.color == w if w in COLORS else obj.size == SIZE_OF[w] for w in attrs
        )
    for relation in RELATIONS:
        rel = relation.split()
        if pred[: len(rel)] == rel:
            other, end = _resolve(pred, len(rel), scene, sentence)
            if end != len(pred):
                raise ValueError(f"claim {sentence!r}: trailing words {pred[end:]}")
            return relation_holds(obj, other, relation)
    raise ValueError(f"claim {sentence!r}: cannot parse the predicate {' '.join(pred)!r}")
