"""Caption a whole COCO-format split with a trained captioner and score it (`captioner-eval coco`).

`root` holds `<split>/` images and `annotations/captions_<split>.json` (COCO 2017 and the shapes world alike).
Images come from the CLIP feature cache `root/features` when it has the split and was built by this model's
CLIP, else they are decoded and CLIP-preprocessed. Captions are appended to `<out>.partial.jsonl` batch by batch,
so a killed run keeps its work and a rerun captions only the rest; the results file (COCO results format) is
written atomically at the end and the progress file removed. Scores cover every captioned image of the split,
so CIDEr-D's document frequencies come from the whole reference corpus (validation sees a subset).

Shapes: B images, N image tokens, D CLIP width, S image side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from captioner.data.coco_format import CaptionIndex, load_captions
from captioner.data.feature_cache import FeatureStore, cache_paths, encoder_identity
from captioner.data.image_source import ImageSource
from captioner.errors import UserError
from captioner.eval.caption_metrics import resolve_backend, score_captions, tokenize_java
from captioner.io import save_json, save_text
from captioner.models.captioner import (
    Captioner,
    caption_batch,
    generation_settings,
    load_captioner,
    resolve_device,
)
from captioner.optim import weights_fingerprint

log = logging.getLogger(__name__)


@dataclass
class SplitResult:
    """What `evaluate_split` did: the scores (METRICS keys, plus "spice" when its jars exist), how many images
    were scored and skipped, this run's captioning speed (None when everything came from a previous run), the
    results file, and where image tensors came from ("features" or "pixels")."""

    scores: dict
    n: int
    skipped: int
    images_per_sec: float | None
    results_path: Path
    source: str


def default_results_path(root: str | Path, split: str, ckpt: str | Path, header: dict) -> Path:
    """`<root>/results/<split>_<ckpt stem>_<8 hex>.json`, the hex a digest of the weights and decoding settings
    (`header`): every run's last.ckpt, and every --beams, gets its own file (one evaluation never overwrites
    another's); the same weights and settings the same one."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
    return Path(root) / "results" / f"{split}_{Path(ckpt).stem}_{digest[:8]}.json"


# ------------------------------------------------------------------------------------------------------------
# images


def matching_feature_store(features_dir: Path, split: str, model: Captioner, index: CaptionIndex):
    """The split's FeatureStore when it exists, covers every image and was built by the model's own CLIP (same
    weights, image size and token shape); None otherwise, so the caller decodes pixels."""
    _, meta = cache_paths(features_dir, split)
    if not meta.is_file():
        return None
    try:
        store = FeatureStore(features_dir, split)
    except (OSError, ValueError) as err:
        log.warning("ignoring feature cache %s: %s", meta, err)
        return None
    if store.encoder != encoder_identity(model.vision, model.vision.image_size):
        log.warning("ignoring feature cache %s: built with another CLIP than the model's", meta)
        return None
    if any(image_id not in store for image_id in index.image_ids):
        log.warning("ignoring feature cache %s: it lacks images of %s", meta, index.path)
        return None
    return store


class _SplitImages(Dataset):
    """Item k = (position in the index, image tensor or None when unreadable): CLIP features (N, D) from the
    cache, or decoded, CLIP-preprocessed pixels (3, S, S)."""

    def __init__(self, index: CaptionIndex, positions: list[int], features: FeatureStore | None, size: int):
        self.positions, self.source = positions, ImageSource(index, image_size=size, features=features)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None]:
        return self.positions[k], self.source.load(self.positions[k])


def _collate(
    items: list[tuple[int, torch.Tensor | None]],
) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """(readable positions, their images stacked (B, ...) or None, unreadable positions)."""
    good = [(i, x) for i, x in items if x is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, [i for i, x in items if x is None]


# ------------------------------------------------------------------------------------------------------------
# progress file: a header line, then one {"image_id", "caption"} line per captioned image


def progress_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def _header_line(header: dict) -> str:
    return json.dumps({"header": header}) + "\n"


def read_progress(path: Path, header: dict) -> dict[int, str]:
    """Captions a previous run of the same weights and settings wrote; {} for a missing or foreign file. The file
    is (re)written with the header and only its whole lines, so appending continues cleanly after a torn line."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a run killed mid-write leaves a partial last line
    if not records or records[0] != json.loads(_header_line(header)):
        if records:
            log.warning("%s: written with other weights or settings; captioning from scratch", path)
        records = [{"header": header}]
    done = {int(r["image_id"]): r["caption"] for r in records[1:]}
    save_text(path, _header_line(header) + "".join(json.dumps(r) + "\n" for r in records[1:]))
    return done


# ------------------------------------------------------------------------------------------------------------
# captioning


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TimeRemainingColumn
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} images/s" if task.speed else "… images/s")

    # stderr: stdout's last line is the JSON scripts read
    columns = (
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecond(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True))


def caption_images(
    model: Captioner,
    index: CaptionIndex,
    positions: list[int],
    features: FeatureStore | None,
    generation: dict,
    progress_file,
    *,
    batch_size: int,
    num_workers: int = 0,
    total: int | None = None,
) -> tuple[dict[int, str], int]:
    """Caption the images at `positions` in batches on the model's device, appending each batch's captions to
    `progress_file` (an open text file) as JSON lines. Returns ({image_id: caption}, number of unreadable images
    skipped)."""
    dataset = _SplitImages(index, positions, features, model.vision.image_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=next(model.parameters()).is_cuda,
    )
    key, source = ("pixel_values", "pixels") if features is None else ("features", "features")
    captions, skipped = {}, 0
    total = len(positions) if total is None else total
    with _progress_bar() as bar:
        task = bar.add_task(
            f"{index.image_dir.name} ({source})", total=total, completed=total - len(positions)
        )
        for good, images, bad in loader:
            for i in bad:
                log.warning("skipping unreadable image %s", index.image_path(i))
            skipped += len(bad)
            if good:
                texts = caption_batch(model, **{key: images}, **generation)
                batch = {index.image_ids[i]: text for i, text in zip(good, texts, strict=True)}
                progress_file.write(
                    "".join(json.dumps({"image_id": k, "caption": v}) + "\n" for k, v in batch.items())
                )
                progress_file.flush()  # a killed run keeps every finished batch
                captions.update(batch)
            bar.advance(task, len(good) + len(bad))
    return captions, skipped


# ------------------------------------------------------------------------------------------------------------
# SPICE


def spice_score(predictions: dict[int, str], references: dict[int, list[str]]) -> float | None:
    """pycocoevalcap's SPICE, or None when Java or its Stanford CoreNLP jars are missing (pycocoevalcap would
    download them on first use; this project runs offline) or when SPICE fails."""
    from pycocoevalcap.spice import get_stanford_models as corenlp

    lib = Path(corenlp.SPICEDIR) / corenlp.SPICELIB
    jars = [lib / f"{corenlp.JAR}.jar", lib / f"{corenlp.JAR}-models.jar"]
    if shutil.which("java") is None or not all(jar.is_file() for jar in jars):
        return None
    from pycocoevalcap.spice.spice import Spice

    ids = sorted(predictions)
    tokens = tokenize_java(
        {**{("ref", i): references[i] for i in ids}, **{("hyp", i): [predictions[i]] for i in ids}}
    )
    try:
        score, _ = Spice().compute_score(
            {i: tokens[("ref", i)] for i in ids}, {i: tokens[("hyp", i)] for i in ids}
        )
    except (OSError, subprocess.CalledProcessError, ValueError) as err:  # e.g. the JVM's 8 GB heap refused
        warnings.warn(f"SPICE failed ({type(err).__name__}: {err}); leaving it out", stacklevel=2)
        return None
    return float(score)


# ------------------------------------------------------------------------------------------------------------
# the whole split


def default_num_workers() -> int:
    """Image decoding workers: up to 4, one core left for the model."""
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def evaluate_split(
    ckpt: str | Path,
    root: str | Path,
    split: str = "val2017",
    *,
    out: str | Path | None = None,
    beams: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    backend: str = "auto",
    num_workers: int | None = None,
) -> SplitResult:
    """Caption every image of `root`'s `split` that has reference captions with the captioner at `ckpt` (a
    caption checkpoint or exported directory), write the COCO results file `out` (default
    `<root>/results/<split>_<ckpt stem>_<digest of weights and settings>.json`) and score it. Resumes from
    `<out>.partial.jsonl` when present.
    `num_workers`: image decoding processes (default: up to 4 for image files, none for cached features).

    Raises FileNotFoundError for a missing checkpoint, root, annotation file or image folder and ValueError for
    bad settings, before any model is loaded where it can.
    """
    root, ckpt = Path(root), Path(ckpt)
    backend = resolve_backend(backend)
    device = resolve_device(device)
    if batch_size < 1 or (beams is not None and beams < 1):
        raise UserError(f"batch_size and beams must be >= 1, got {batch_size} and {beams}")
    if not ckpt.exists():
        raise UserError(f"checkpoint not found: {ckpt}")
    index = load_captions(root, split)

    model, hparams = load_captioner(ckpt)
    generation = generation_settings(hparams.get("generation"), beams)
    header = {"split": split, "weights": weights_fingerprint(model), "generation": generation}
    out = Path(out) if out is not None else default_results_path(root, split, ckpt, header)
    features = matching_feature_store(root / "features", split, model, index)
    if features is None and not index.image_dir.is_dir():
        raise UserError(f"image directory not found: {index.image_dir}")
    if num_workers is None:
        # Decoding workers pay off for image files only: cached features are memory-mapped reads.
        num_workers = default_num_workers() if features is None else 0
    model.to(device)

    # Images without reference captions could not be scored, and would make the results file invalid for scoring.
    referenced = [i for i in range(len(index.image_ids)) if index.offsets[i + 1] > index.offsets[i]]
    partial = progress_path(out)
    captions = read_progress(partial, header)
    todo = [i for i in referenced if index.image_ids[i] not in captions]
    if len(todo) < len(referenced):
        log.warning(
            "%s: resuming, %d of %d images already captioned",
            partial,
            len(referenced) - len(todo),
            len(referenced),
        )
    start = time.perf_counter()
    with open(partial, "a", encoding="utf-8") as progress_file:
        new, skipped = caption_images(
            model,
            index,
            todo,
            features,
            generation,
            progress_file,
            batch_size=batch_size,
            num_workers=num_workers,
            total=len(referenced),
        )
    seconds = time.perf_counter() - start
    captions.update(new)
    if skipped:
        log.warning("%s: skipped %d unreadable image(s)", index.path, skipped)

    results = [
        {"image_id": index.image_ids[i], "caption": captions[index.image_ids[i]]}
        for i in referenced
        if index.image_ids[i] in captions
    ]
    if not results:
        raise UserError(f"{index.path}: no image of split {split!r} could be captioned")
    save_json(out, results)
    partial.unlink()

    predictions = {r["image_id"]: r["caption"] for r in results}
    references = {image_id: index.image_captions(index.position[image_id]) for image_id in predictions}
    scores, _ = score_captions(predictions, references, backend=backend)
    if backend == "pycocoevalcap" and (spice := spice_score(predictions, references)) is not None:
        scores["spice"] = spice
    return SplitResult(
        scores=scores,
        n=len(predictions),
        skipped=skipped,
        images_per_sec=len(new) / seconds if new else None,
        results_path=out,
        source="pixels" if features is None else "features",
    )
