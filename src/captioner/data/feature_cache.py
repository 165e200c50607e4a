"""CLIP feature cache: CLIP is frozen, so its output tokens are computed once per image and read back from disk.

Files, per split, in `out_dir`:
    <split>.f16    raw float16 array (num_images, N, D), memory-mapped; rows in the annotation file's image order
    <split>.json   {"split", "image_ids", "shape", "dtype": "float16", "ok": [bool per image], "encoder": {...}}
While building, `<split>.f16.partial` and `<split>.progress.json` hold the work so far; `<split>.json` is written
last, so its presence means the cache is complete.

Shapes: B images, N image tokens (50 for ViT-B/32), D CLIP width (768 for ViT-B/32), S image side.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.data.coco_format import load_captions
from captioner.errors import UserError
from captioner.io import save_json
from captioner.models.vision import ClipPreprocess
from captioner.optim import weights_fingerprint

log = logging.getLogger(__name__)

DTYPE = np.float16


def encoder_identity(encoder, image_size: int) -> dict:
    """What makes two caches interchangeable: the CLIP (name and a weights fingerprint) and the output shape.

    The fingerprint matters for randomly initialised CLIPs, which share a name (none) but not their weights.
    """
    return {
        "clip": encoder.clip.config.name_or_path or None,
        "hidden_size": int(encoder.hidden_size),
        "num_tokens": int(encoder.num_tokens),
        "image_size": int(image_size),
        "fingerprint": weights_fingerprint(encoder.clip),
    }


def cache_paths(out_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(data file, metadata file) of one split's cache."""
    out_dir = Path(out_dir)
    return out_dir / f"{split}.f16", out_dir / f"{split}.json"


class _ImageFiles(Dataset):
    """(CLIP-preprocessed image (3, S, S), ok); an unreadable image gives zeros and ok=False."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths, self.image_size = paths, image_size
        self.preprocess = ClipPreprocess(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        pixels = self.preprocess(self.paths[i])
        if pixels is None:
            return torch.zeros(3, self.image_size, self.image_size), False
        return pixels, True


def _matches(meta: dict, header: dict) -> bool:
    return all(meta.get(key) == value for key, value in header.items())


def build_feature_cache(
    encoder,
    root: str | Path,
    split: str,
    out_dir: str | Path,
    *,
    image_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    save_every: int = 16,
) -> Path:
    """Encode every image of `root/annotations/captions_<split>.json` with `encoder.encode` into `out_dir`.

    encoder: has `encode(pixel_values (B, 3, S, S)) -> (B, N, D)` and `num_tokens`, `hidden_size`, `clip`
    (captioner.models.vision.VisionEncoder); it is moved to `device` and run in eval mode without gradients.
    Resumable: progress is recorded atomically every `save_every` batches and a re-run continues from there; a
    finished cache of the same encoder and images is left as it is. Unreadable images get zero rows and
    ok=false. Returns the data file's path.
    """
    index = load_captions(root, split)
    if getattr(encoder, "image_size", image_size) != image_size:
        raise UserError(f"image_size {image_size} differs from the encoder's {encoder.image_size}")
    data_path, meta_path = cache_paths(out_dir, split)
    partial = data_path.with_name(data_path.name + ".partial")
    progress_path = data_path.with_name(f"{split}.progress.json")
    shape = [len(index.image_ids), int(encoder.num_tokens), int(encoder.hidden_size)]
    header = {
        "split": split,
        "image_ids": index.image_ids,
        "shape": shape,
        "dtype": "float16",
        "encoder": encoder_identity(encoder, image_size),
    }
    if meta_path.exists() and data_path.exists() and _matches(json.loads(meta_path.read_text()), header):
        log.info("%s: feature cache complete", data_path)
        return data_path

    done, ok = 0, []
    if progress_path.exists() and partial.exists():
        progress = json.loads(progress_path.read_text())
        if _matches(progress, header):
            done, ok = int(progress["done"]), list(progress["ok"])
    if done == 0:
        data_path.parent.mkdir(parents=True, exist_ok=True)
        np.memmap(partial, dtype=DTYPE, mode="w+", shape=tuple(shape)).flush()  # sized (sparse) file
    store = np.memmap(partial, dtype=DTYPE, mode="r+", shape=tuple(shape))

    paths = [index.image_path(i) for i in range(done, shape[0])]
    loader = DataLoader(_ImageFiles(paths, image_size), batch_size=batch_size, num_workers=num_workers)
    was_training = encoder.training
    encoder.to(device).eval()
    from rich.progress import Progress

    try:
        with torch.inference_mode(), Progress() as progress_bar:
            task = progress_bar.add_task(f"CLIP features {split}", total=shape[0], completed=done)
            for b, (pixels, good) in enumerate(loader):
                rows = torch.zeros(len(good), *shape[1:], dtype=torch.float16)  # (B, N, D)
                if good.any():
                    feats = encoder.encode(pixels[good].to(device))  # (B_ok, N, D)
                    if tuple(feats.shape[1:]) != tuple(shape[1:]):
                        raise UserError(
                            f"encoder.encode gave {tuple(feats.shape)}, expected (B, {shape[1]}, {shape[2]})"
                        )
                    rows[good] = feats.float().cpu().half()
                store[done : done + len(good)] = rows.numpy()
                done += len(good)
                ok += good.tolist()
                progress_bar.advance(task, len(good))
                if (b + 1) % save_every == 0:
                    store.flush()  # rows on disk before the progress file claims them
                    save_json(progress_path, {**header, "done": done, "ok": ok})
    finally:
        encoder.train(was_training)
    store.flush()
    del store
    os.replace(partial, data_path)
    save_json(meta_path, {**header, "ok": ok})
    progress_path.unlink(missing_ok=True)
    if not all(ok):
        log.warning("%s: %d unreadable image(s) cached as ok=false", data_path, ok.count(False))
    return data_path


class FeatureStore:
    """Read one split's cache: `store.get(image_id)` → (N, D) float16 array (a copy; the cache is never mutated).

    The memmap is opened lazily in each process, so the store pickles cheaply into DataLoader workers.
    """

    def __init__(self, out_dir: str | Path, split: str):
        self.data_path, self.meta_path = cache_paths(out_dir, split)
        if not self.meta_path.is_file() or not self.data_path.is_file():
            raise UserError(
                f"feature cache not found: {self.meta_path} / {self.data_path} "
                "(build it with `captioner-prepare coco --features`)"
            )
        try:
            meta = json.loads(self.meta_path.read_text())
            self.shape = tuple(int(s) for s in meta["shape"])
            image_ids, ok = meta["image_ids"], meta["ok"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{self.meta_path}: not a feature-cache metadata file ({err!r})") from err
        if meta.get("dtype") != "float16" or len(self.shape) != 3:
            got = f"{meta.get('dtype')!r} {self.shape}"
            raise UserError(f"{self.meta_path}: expected dtype float16 and a 3-d shape, got {got}")
        expected = int(np.prod(self.shape)) * np.dtype(DTYPE).itemsize
        if (size := self.data_path.stat().st_size) != expected:
            raise UserError(f"{self.data_path}: {size} bytes, but shape {self.shape} needs {expected}")
        if len(image_ids) != self.shape[0] or len(ok) != self.shape[0]:
            raise UserError(f"{self.meta_path}: image_ids/ok lengths do not match shape {self.shape}")
        self.encoder = meta.get("encoder", {})
        self.image_ids = [int(i) for i in image_ids]
        self.ok = [bool(v) for v in ok]
        self.row = {image_id: r for r, image_id in enumerate(self.image_ids)}
        self._array = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.row

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.data_path, dtype=DTYPE, mode="r", shape=self.shape)
        return self._array

    def get(self, image_id: int) -> np.ndarray | None:
        """(N, D) float16 features, or None if the image was unreadable when the cache was built."""
        r = self.row[image_id]
        return np.array(self.array[r]) if self.ok[r] else None


def check_cache_fits(features_dir: str | Path, split: str, *, clip: str | None, trainable) -> None:
    """Refuse a cache that cannot stand in for the model's CLIP: CLIP trains (`vision` in `trainable`), or the
    cache was built with another named CLIP."""
    if "vision" in trainable:
        raise UserError(
            f"data.features_dir={features_dir} serves precomputed CLIP outputs, but model.trainable includes "
            "'vision': a trained CLIP needs pixels (set data.features_dir=null or drop 'vision')"
        )
    _, meta_file = cache_paths(features_dir, split)
    if meta_file.exists():
        cached = json.loads(meta_file.read_text()).get("encoder", {}).get("clip")
        if cached and clip and cached != clip:
            raise UserError(f"{meta_file}: features were computed with CLIP {cached!r}, model uses {clip!r}")
