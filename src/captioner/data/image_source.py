"""One split's image tensors by position, from image files or from the CLIP feature cache: what the caption
DataModule and the whole-split evaluation both read (no Lightning here)."""

from __future__ import annotations

import torch

from captioner.data.coco_format import CaptionIndex
from captioner.models.vision import ClipPreprocess


class ImageSource:
    """Where one split's image tensors come from: decoded + CLIP-preprocessed files ("pixel_values", (3, S, S)
    float32), or the CLIP feature cache ("features", (N, D) float32, no image decoding at all)."""

    def __init__(self, index: CaptionIndex, *, image_size: int, features=None):
        self.index = index
        self.features = features  # a FeatureStore, or None
        self.preprocess = None if features is not None else ClipPreprocess(image_size)
        self.key = "features" if features is not None else "pixel_values"
        self.shape = tuple(features.shape[1:]) if features is not None else (3, image_size, image_size)

    def load(self, i: int) -> torch.Tensor | None:
        """Image i's tensor, or None when it cannot be read (or was unreadable when the cache was built)."""
        if self.features is not None:
            feats = self.features.get(self.index.image_ids[i])
            return None if feats is None else torch.from_numpy(feats).float()  # (N, D)
        return self.preprocess(self.index.image_path(i))  # (3, S, S)
