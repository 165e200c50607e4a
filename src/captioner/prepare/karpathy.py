"""Karpathy's COCO splits (`captioner-prepare coco --karpathy dataset_coco.json`): the split every COCO captioning
paper reports on (Karpathy & Fei-Fei 2015), 113,287 train (train + restval) / 5,000 val / 5,000 test images.

Its images are COCO 2014's, which COCO 2017 holds under the same ids (train2017 = train2014 + val2014 minus
val2017), so a prepared COCO 2017 root has them all. Each split becomes an ordinary caption split of that root:
`annotations/captions_karpathy_<split>.json` (COCO captions format, Karpathy's `raw` sentences and `sentid`s)
and `karpathy_<split>/`, a directory of relative symlinks into train2017/ and val2017/, so every DataModule,
evaluator and `captioner-eval coco --split karpathy_test` reads it unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from captioner.data.coco_format import annotation_path, load_captions
from captioner.errors import UserError
from captioner.io import save_json

log = logging.getLogger(__name__)

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
EXPECTED = {"train": 113_287, "val": 5_000, "test": 5_000}  # Karpathy's dataset_coco.json
COCO_DIRS = ("train2017", "val2017")


def read_split_file(path: Path) -> dict[str, list[dict]]:
    """{split: [image records]} from Karpathy's dataset_coco.json, validated."""
    if not path.is_file():
        raise UserError(
            f"Karpathy split file not found: {path} (dataset_coco.json from Karpathy's caption_datasets.zip)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: expected Karpathy's format, an object with an `images` list")
    if data.get("dataset", "coco") != "coco":
        raise UserError(f"{path}: a split file of {data['dataset']!r}, not COCO (dataset_coco.json)")
    names = {s: split for split, sources in SPLITS.items() for s in sources}
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict) or not all(k in image for k in ("cocoid", "split", "sentences")):
            raise UserError(f"{where} needs cocoid, split and sentences")
        if image["split"] not in names:
            raise UserError(f"{where}: split {image['split']!r} is none of {sorted(names)}")
        sentences = image["sentences"]
        if (
            not isinstance(sentences, list)
            or not sentences
            or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences)
        ):
            raise UserError(f"{where}: sentences must be a non-empty list of {{raw, sentid}}")
        splits[names[image["split"]]].append(image)
    return splits


def _locate(root: Path, image_id: int) -> str | None:
    """The COCO 2017 directory holding image `image_id`, if any."""
    name = f"{image_id:012d}.jpg"
    return next((d for d in COCO_DIRS if (root / d / name).is_file()), None)


def prepare_karpathy(root: str | os.PathLike, split_file: str | os.PathLike) -> dict[str, int]:
    """Write the three Karpathy splits into the COCO 2017 root `root`; returns {split: images}. Every image is
    located before anything is written; finished splits (annotations in place) are kept, so a re-run is cheap."""
    root, split_file = Path(root), Path(split_file)
    missing_dirs = [d for d in COCO_DIRS if not (root / d).is_dir()]
    if missing_dirs:
        raise UserError(f"{root}: no {' or '.join(missing_dirs)}/; run `captioner-prepare coco` first")
    splits = read_split_file(split_file)
    plans = {}
    for split, images in splits.items():
        if not images:
            raise UserError(f"{split_file}: no {split} images (split {' or '.join(SPLITS[split])})")
        if len(images) != EXPECTED[split]:
            log.warning(
                "%s: %s has %d images, Karpathy's has %d", split_file, split, len(images), EXPECTED[split]
            )
        plans[f"karpathy_{split}"] = _plan(root, f"karpathy_{split}", images, split_file)
    for name, (records, captions, links) in plans.items():
        if annotation_path(root, name).is_file() and (root / name).is_dir():
            log.info("%s: already in place", name)
        else:
            _write(root, name, records, captions, links)
            log.info("%s: %d images, %d captions", name, len(records), len(captions))
        load_captions(root, name)  # what every reader will do: it must pass
    return {name.removeprefix("karpathy_"): len(plan[0]) for name, plan in plans.items()}


def _plan(root: Path, name: str, images: list[dict], split_file: Path):
    """(image records, caption annotations, {file name: symlink target}) of one split."""
    records, annotations, links = [], [], {}
    for image in images:
        image_id = int(image["cocoid"])
        file_name = f"{image_id:012d}.jpg"
        folder = _locate(root, image_id)
        if folder is None:
            raise UserError(
                f"{split_file}: image {image_id} ({name}) is in neither {root}/train2017/ nor {root}/val2017/"
            )
        links[file_name] = Path("..") / folder / file_name
        records.append({"id": image_id, "file_name": file_name})
        for s in image["sentences"]:
            sentid = int(s.get("sentid", len(annotations)))
            annotations.append({"id": sentid, "image_id": image_id, "caption": s["raw"]})
    return records, annotations, links


def _write(root: Path, name: str, records: list, annotations: list, links: dict) -> None:
    # the links appear whole or not at all: built beside, then renamed into place; the annotations, written
    # last, mark the split finished
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file_name, target in links.items():
        (tmp / file_name).symlink_to(target)
    shutil.rmtree(root / name, ignore_errors=True)
    tmp.rename(root / name)
    save_json(annotation_path(root, name), {"images": records, "annotations": annotations})
