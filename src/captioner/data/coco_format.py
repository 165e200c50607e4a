"""The COCO captions formats, read and validated (then indexed by pycocotools): caption annotations
(`root/annotations/captions_<split>.json` beside the images in `root/<split>/`) and results files.

COCO captions json: `images` [{id, file_name, ...}], `annotations` [{id, image_id, caption}]. COCO 2017's splits
are train2017/val2017; the shapes world writes train/val in the same layout.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from captioner.errors import UserError


@dataclass
class CaptionIndex:
    """One split's annotations, validated. Images keep the annotation file's order; captions are grouped by
    image (caption c belongs to image `caption_image[c]`, image i owns captions `offsets[i]:offsets[i+1]`)."""

    path: Path  # the annotation file, for messages
    image_dir: Path
    image_ids: list[int]
    position: dict[int, int]  # image id -> position in image_ids
    file_names: list[str]
    captions: list[str]  # raw text, grouped by image
    caption_image: np.ndarray  # (num_captions,) int64 image position of each caption
    offsets: np.ndarray  # (num_images + 1,) int64

    def image_captions(self, i: int) -> list[str]:
        return self.captions[self.offsets[i] : self.offsets[i + 1]]

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.file_names[i]


def annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"captions_{split}.json"


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def _check_fields(record, fields: dict[str, type], where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, got {type(record).__name__}")
    for key, kind in fields.items():
        if key not in record:
            raise UserError(f"{where}: missing key {key!r}")
        value = record[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: key {key!r} must be {kind.__name__}, got {value!r}")


def _quiet():
    # pycocotools prints progress to stdout, whose last line the eval CLI keeps for its JSON.
    return contextlib.redirect_stdout(io.StringIO())


def load_annotations(path: str | Path, image_fields: dict[str, type] | None = None) -> COCO:
    """A COCO captions file, validated (every problem named with its file and key), as pycocotools' `COCO`.

    `image_fields`: what every `images` entry must hold (default {"id": int}); annotations need id, image_id and
    caption, and must point at a listed image; image ids are unique.
    """
    path = Path(path)
    data = _read_json(path, "caption annotations")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise UserError(f"{path}: missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise UserError(f"{path}: top-level key {key!r} must be a list, got {type(data[key]).__name__}")
    image_ids = set()
    for i, image in enumerate(data["images"]):
        _check_fields(image, image_fields or {"id": int}, f"{path}: images[{i}]")
        if image["id"] in image_ids:
            raise UserError(f"{path}: images[{i}] repeats image id {image['id']}")
        image_ids.add(image["id"])
    for j, ann in enumerate(data["annotations"]):
        _check_fields(ann, {"id": int, "image_id": int, "caption": str}, f"{path}: annotations[{j}]")
        if ann["image_id"] not in image_ids:
            raise UserError(
                f"{path}: annotations[{j}] has image_id {ann['image_id']}, which is not in 'images'"
            )
    # Checked here, then indexed by pycocotools: COCO(path) meets a malformed file with a bare assert.
    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


def load_results(path: str | Path) -> list[dict]:
    """A COCO results file `[{"image_id": int, "caption": str}, …]`, validated: one prediction per image."""
    # Our checks, not loadRes's: it asserts without naming the file and silently keeps duplicate predictions.
    path = Path(path)
    data = _read_json(path, "predictions")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of {{'image_id', 'caption'}} objects (COCO results format)")
    if not data:
        raise UserError(f"{path}: no predictions (an empty list)")
    seen = set()
    for i, entry in enumerate(data):
        _check_fields(entry, {"image_id": int, "caption": str}, f"{path}: entry {i}")
        if entry["image_id"] in seen:
            raise UserError(f"{path}: image_id {entry['image_id']!r} appears more than once")
        seen.add(entry["image_id"])
    return data


def load_results_against(results: list[dict], annotations: COCO) -> COCO:
    """pycocotools' results index (`COCO.loadRes`) of validated results, quietly."""
    with _quiet():
        return annotations.loadRes(results)


def load_captions(root: str | Path, split: str, prepare_hint: str = "captioner-prepare coco") -> CaptionIndex:
    """Read and validate `root/annotations/captions_<split>.json` into a CaptionIndex.

    Missing root or file → FileNotFoundError naming it and `prepare_hint`; bad JSON, missing keys, wrong types,
    a caption of an unknown image, duplicate image ids or an empty split → ValueError naming the file and the
    offending key or value.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"caption data root not found: {root} (run `{prepare_hint}`)")
    path = annotation_path(root, split)
    if not path.is_file():
        raise UserError(f"caption annotations not found: {path} (run `{prepare_hint}`)")
    coco = load_annotations(path, image_fields={"id": int, "file_name": str})
    images = coco.dataset["images"]
    if not images:
        raise UserError(f"{path}: split {split!r} is empty ('images' is an empty list)")
    if not coco.dataset["annotations"]:
        raise UserError(f"{path}: split {split!r} has no captions ('annotations' is an empty list)")
    image_ids = [image["id"] for image in images]
    grouped = [[ann["caption"] for ann in coco.imgToAnns.get(image_id, [])] for image_id in image_ids]
    counts = np.array([len(g) for g in grouped], dtype=np.int64)
    offsets = np.zeros(len(grouped) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return CaptionIndex(
        path=path,
        image_dir=root / split,
        image_ids=image_ids,
        position={image_id: i for i, image_id in enumerate(image_ids)},
        file_names=[image["file_name"] for image in images],
        captions=[c for g in grouped for c in g],
        caption_image=np.repeat(np.arange(len(grouped), dtype=np.int64), counts),
        offsets=offsets,
    )
