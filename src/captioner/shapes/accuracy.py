"""Object accuracy: does a caption name exactly the scene's objects? The shapes world's caption metric.

`ObjectAccuracy` is the scorer training instantiates from config to validate generated captions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from captioner.errors import UserError
from captioner.shapes.text import GENERIC_NOUNS, NUMBER_OF, SIZE_OF, split_words
from captioner.shapes.world import COLORS, SHAPES, Scene, load_scenes

_SHAPE_NOUNS = {s: (s, False) for s in SHAPES} | {s + "s": (s, True) for s in SHAPES}


def _noun_phrase_before(words: list[str], i: int) -> tuple[str | None, set[str], str | None]:
    """Modifiers of the noun at words[i]: (colour, sizes, determiner) read backwards over colour/size words.

    The determiner is "a"/"an", a number word or digits, "the", or None. Two colours ("a red blue circle")
    give colour "?" so the mention can never match a scene.
    """
    color, sizes, j = None, set(), i - 1
    while j >= 0 and (words[j] in COLORS or words[j] in SIZE_OF):
        if words[j] in COLORS:
            color = words[j] if color is None else "?"
        else:
            sizes.add(SIZE_OF[words[j]])
        j -= 1
    det = (
        words[j]
        if j >= 0 and (words[j] in ("a", "an", "the") or words[j] in NUMBER_OF or words[j].isdigit())
        else None
    )
    return color, sizes, det


def _count(det: str | None, plural: bool) -> int | None:
    """How many things an indefinite noun phrase introduces; None when its form does not say."""
    if det in ("a", "an"):
        return None if plural else 1
    if det is not None and det.isdigit():
        return int(det)
    if det in NUMBER_OF:
        return NUMBER_OF[det]
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
    words = split_words(caption)
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
        elif word in GENERIC_NOUNS:
            color, _, det = _noun_phrase_before(words, i)
            if det == "the" and color is not None:
                definite.append((color, None))
            elif det is not None and det not in ("a", "an", "the"):
                totals.append(_count(det, GENERIC_NOUNS[word]))
    truth = Counter((o.color, o.shape) for o in scene.objects)
    if mentioned != truth or any(t != len(scene.objects) for t in totals):
        return False
    return all(
        any((c is None or c == color) and (s is None or s == shape) for color, shape in mentioned)
        for c, s in definite
    )


def _matches(captions: dict[int, str], scenes: dict[int, Scene | dict], who: str) -> dict[int, bool]:
    """{image_id: `caption_matches_scene`} for each caption; scenes may be keyed by int or str image ids."""
    if not captions:
        raise UserError(f"{who}: no captions to score")
    matches = {}
    for image_id, caption in captions.items():
        scene = scenes.get(image_id, scenes.get(str(image_id)))
        if scene is None:
            raise UserError(f"{who}: no scene for image_id {image_id!r}")
        matches[image_id] = caption_matches_scene(caption, scene)
    return matches


def object_accuracy(captions: dict[int, str], scenes: dict[int, Scene | dict]) -> float:
    """Fraction of `captions` ({image_id: caption}) for which `caption_matches_scene` holds."""
    matches = _matches(captions, scenes, "object_accuracy")
    return sum(matches.values()) / len(matches)


class ObjectAccuracy:
    """Caption scorer for the shapes world: does a caption name exactly the scene's objects?

    scenes: a `scenes_<split>.json` written by `captioner-prepare shapes`. It is read on the first call, not
    here, so the scorer can be built from config before the data is prepared; then kept for later calls.
    """

    def __init__(self, scenes: str | Path):
        self.scenes = Path(scenes)
        self._loaded: dict[int, Scene] | None = None

    def __call__(
        self, predictions: dict[int, str], references: dict[int, list[str]]
    ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """({"object_acc": fraction}, {image_id: {"object_acc": 1.0 or 0.0}}) for predictions {image_id:
        caption}. `references` is unused (the scene, not its captions, is the truth); scorers share the call."""
        if self._loaded is None:
            self._loaded = load_scenes(self.scenes)
        matches = _matches(predictions, self._loaded, str(self.scenes))
        per_image = {image_id: {"object_acc": float(hit)} for image_id, hit in matches.items()}
        return {"object_acc": sum(matches.values()) / len(matches)}, per_image
