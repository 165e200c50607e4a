"""Captioning with a trained model from Python: `captioner.load(PATH).caption(images_or_paths)`.

    import captioner
    pipeline = captioner.load("outputs/caption_coco2017/…/checkpoints/last.ckpt")  # or an exported directory
    pipeline.caption(["cat.jpg", PIL.Image.open("dog.png")], beams=5)               # -> ["a cat on a sofa", …]

The command line (`captioner-caption`) and the web server (`captioner-serve`) are built on this module; the
tensors → text step below it (`models.captioner.caption_batch`) is the one evaluation and training call too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import IO

import torch
from PIL import Image

from captioner.models.captioner import (
    Captioner,
    caption_batch,
    generation_settings,
    load_captioner,
    resolve_device,
)
from captioner.models.vision import ClipPreprocess, UnreadableImage, open_image

ImageLike = Image.Image | str | os.PathLike | IO[bytes]


def describe(image: ImageLike, index: int) -> str:
    """A name for an image in error messages: its path, or its position (and size) for an in-memory one."""
    if isinstance(image, Image.Image):
        return f"image {index} (PIL {image.mode} {image.width}x{image.height})"
    if isinstance(image, str | os.PathLike):
        return str(image)
    return str(getattr(image, "name", f"image {index} (file object)"))


class CaptionPipeline:
    """Images in, captions out: a trained Captioner (the nn.Module, `.model`) on a device in eval mode, with
    CLIP's preprocessing and the generation settings it was trained with (`generation`, as in
    `Captioner.generate`) as the defaults. `captioner.load` returns one.

    On a GPU the model runs under bf16 autocast, as it was validated during training (`caption_batch`). Not
    thread-safe: call it from one thread at a time (the server's batcher does).
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

    def caption_pixels(self, pixel_values: torch.Tensor, beams: int | None = None, **generation) -> list[str]:
        """Captions for preprocessed images (B, 3, S, S), one model call."""
        return caption_batch(self.model, pixel_values, **self.settings(beams, **generation))

    def iter_captions(
        self,
        images: ImageLike | Iterable[ImageLike],
        beams: int | None = None,
        batch_size: int = 16,
        on_unreadable: Callable[[UnreadableImage], None] | None = None,
        **generation,
    ) -> Iterator[tuple[int, str]]:
        """(position in `images`, caption) per image, in order, yielded a batch at a time as each is captioned:
        what `caption` collects, for a caller that shows captions as they come. An unreadable image raises
        UnreadableImage (a ValueError naming it), or with `on_unreadable` is handed to it and left out."""
        if isinstance(images, str | os.PathLike | Image.Image | io.IOBase):
            images = [images]
        images = list(images)
        self.settings(beams, **generation)  # a bad `beams` fails before any image is decoded
        for start in range(0, len(images), batch_size):
            positions, pixels = [], []
            for position in range(start, min(start + batch_size, len(images))):
                image = images[position]
                try:
                    pixels.append(self.preprocess(image, describe(image, position)))
                except UnreadableImage as err:
                    if on_unreadable is None:
                        raise
                    on_unreadable(err)
                    continue
                positions.append(position)
            if positions:
                captions = self.caption_pixels(torch.stack(pixels), beams, **generation)  # (B, 3, S, S) in
                yield from zip(positions, captions, strict=True)

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
        return [caption for _, caption in self.iter_captions(images, beams, batch_size, **generation)]

    def __repr__(self) -> str:
        return f"CaptionPipeline(source={self.source!r}, device={self.device}, generation={self.generation})"


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> CaptionPipeline:
    """A CaptionPipeline from a caption run's Lightning checkpoint or an exported captioner directory.
    device: "cpu", "cuda", … (default: cuda when available)."""
    model, hparams = load_captioner(path)
    return CaptionPipeline(model, hparams.get("generation"), device, source=str(path))
