"""Captioning with a trained model from Python: `captioner.load(PATH).caption(images_or_paths)`.

    import captioner
    model = captioner.load("outputs/caption_coco2017/…/checkpoints/last.ckpt")  # or an exported directory
    model.caption(["cat.jpg", PIL.Image.open("dog.png")], beams=5)               # -> ["a cat on a sofa", …]

The command line (`captioner-caption`) and the web server (`captioner-serve`) are built on this module.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import IO

import torch
from PIL import Image

from captioner.models.captioner import Captioner, generation_settings, load_captioner, resolve_device
from captioner.models.vision import ClipPreprocess, open_image

ImageLike = Image.Image | str | os.PathLike | IO[bytes]


def describe(image: ImageLike, index: int) -> str:
    """A name for an image in error messages: its path, or its position (and size) for an in-memory one."""
    if isinstance(image, Image.Image):
        return f"image {index} (PIL {image.mode} {image.width}x{image.height})"
    if isinstance(image, str | os.PathLike):
        return str(image)
    return str(getattr(image, "name", f"image {index} (file object)"))


class CaptionModel:
    """A trained Captioner ready to caption images: on a device, in eval mode, with CLIP's preprocessing and
    the generation settings it was trained with (`generation`, as in `Captioner.generate`) as the defaults.

    On a GPU the model runs under bf16 autocast, as it was validated during training. Not thread-safe: call it
    from one thread at a time (the server's batcher does).
    """

    def __init__(
        self,
        model: Captioner,
        generation: dict | None = None,
        device: str | torch.device | None = None,
        source: str = "",
    ):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        # training's validation decodes with beam search unless its config names a method (CaptionModule)
        self.generation = generation_settings(generation)
        self.transform = ClipPreprocess(model.vision.image_size)
        self.source = source
        self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def info(self) -> dict:
        """What the server reports about the model: where it came from, where it runs, how it decodes."""
        return {
            "source": self.source,
            "device": str(self.device),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "image_size": self.model.vision.image_size,
            "generation": dict(self.generation),
        }

    def settings(self, beams: int | None = None, **generation) -> dict:
        """The `Captioner.generate` keywords for one call: the saved defaults, then `generation`, then `beams`
        (1 → greedy, more → beam search of that width)."""
        return generation_settings(self.generation, beams, **generation)

    def preprocess(self, image: ImageLike, name: str | None = None) -> torch.Tensor:
        """An image (PIL, path or binary file) → CLIP-preprocessed pixels (3, S, S); UnreadableImage if it
        cannot be decoded."""
        if not isinstance(image, Image.Image):
            image = open_image(image, name)
        return self.transform(image)  # (3, S, S)

    @torch.no_grad()
    def caption_pixels(self, pixel_values: torch.Tensor, beams: int | None = None, **generation) -> list[str]:
        """Captions for preprocessed images (B, 3, S, S), one model call."""
        settings = self.settings(beams, **generation)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self.model.caption(pixel_values=pixel_values.to(self.device), **settings)

    def caption(
        self,
        images: ImageLike | Iterable[ImageLike],
        beams: int | None = None,
        batch_size: int = 16,
        **generation,
    ) -> list[str]:
        """One caption per image, in order. `images`: PIL images, paths and/or binary files (or a single one),
        decoded and captioned `batch_size` at a time. `beams` and `generation` override the saved generation
        settings (e.g. max_new_tokens=20, length_penalty=0.8). Raises ValueError naming the first unreadable
        image."""
        if isinstance(images, str | os.PathLike | Image.Image | io.IOBase):
            images = [images]
        images = list(images)
        self.settings(beams, **generation)  # a bad `beams` fails before any image is decoded
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = [self.preprocess(image, describe(image, start + i)) for i, image in enumerate(chunk)]
            captions += self.caption_pixels(torch.stack(pixels), beams, **generation)  # (B, 3, S, S)
        return captions

    def __repr__(self) -> str:
        return f"CaptionModel(source={self.source!r}, device={self.device}, generation={self.generation})"


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> CaptionModel:
    """A CaptionModel from a caption run's Lightning checkpoint or an exported captioner directory.
    device: "cpu", "cuda", … (default: cuda when available)."""
    model, hparams = load_captioner(path)
    return CaptionModel(model, hparams.get("generation"), device, source=str(path))
