"""Captioning with a trained model from Python: `captioner.load(PATH).caption(images_or_paths)`.

    import captioner
    pipeline = captioner.load("outputs/caption_coco2017/…/checkpoints/last.ckpt")  # or an exported directory
    pipeline.caption(["cat.jpg", PIL.Image.open("dog.png")], beams=5)               # -> ["a cat on a sofa", …]
    pipeline.caption("cat.jpg", attention=True)  # -> [{"caption", "tokens", "attention", "cls"}]: where it looked

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
    caption_batch_with_attention,
    generation_settings,
    load_captioner,
    resolve_device,
)
from captioner.models.vision import ClipPreprocess, UnreadableImage, open_image

ImageLike = Image.Image | str | os.PathLike | IO[bytes]
# what `caption` gives per image: the caption, or with attention=True the caption and its maps (see `caption`)
Captioned = str | dict


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

    def caption_pixels(
        self, pixel_values: torch.Tensor, beams: int | None = None, attention: bool = False, **generation
    ) -> list[Captioned]:
        """Captions for preprocessed images (B, 3, S, S), one model call; with `attention`, per image the dict
        `caption` documents (the same caption: the maps come from a pass after decoding)."""
        settings = self.settings(beams, **generation)
        if not attention:
            return caption_batch(self.model, pixel_values, **settings)
        captions, maps = caption_batch_with_attention(self.model, pixel_values, **settings)
        return [{"caption": text, **m.to_dict()} for text, m in zip(captions, maps, strict=True)]

    def iter_captions(
        self,
        images: ImageLike | Iterable[ImageLike],
        beams: int | None = None,
        batch_size: int = 16,
        on_unreadable: Callable[[UnreadableImage], None] | None = None,
        attention: bool = False,
        **generation,
    ) -> Iterator[tuple[int, Captioned]]:
        """(position in `images`, caption) per image, in order, yielded a batch at a time as each is captioned:
        what `caption` collects (with `attention`, its dicts), for a caller that shows captions as they come.
        An unreadable image raises UnreadableImage (a ValueError naming it), or with `on_unreadable` is handed
        to it and left out."""
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
                batch = torch.stack(pixels)  # (B, 3, S, S)
                yield from zip(
                    positions, self.caption_pixels(batch, beams, attention, **generation), strict=True
                )

    def caption(
        self,
        images: ImageLike | Iterable[ImageLike],
        beams: int | None = None,
        batch_size: int = 16,
        attention: bool = False,
        **generation,
    ) -> list[Captioned]:
        """One caption per image, in order. `images`: PIL images, paths and/or binary files (or a single one),
        decoded and captioned `batch_size` at a time. `beams` and `generation` override the saved generation
        settings (e.g. max_new_tokens=20, length_penalty=0.8). Raises ValueError naming the first unreadable
        image.

        attention=True: per image, where each caption token looked (`models.attention_maps`; the captions are
        the same as without), as plain lists ready for JSON:
            {"caption": str, "tokens": [T] str, "attention": [T][H][W] float, "cls": [T] float}
        tokens: the caption's T GPT-2 tokens as text, leading spaces kept ("".join(tokens).strip() == caption,
            except that a character whose bytes span two tokens shows as U+FFFD in each).
        attention[t]: token t's attention over CLIP's patch grid (rows top to bottom, over the centre square
        CLIP sees), averaged over heads and gate-weighted over layers, summing to 1; H = W = 7 for ViT-B/32 at
        224 px, 3 for the shapes demo's stand-in CLIP. cls[t]: the share token t gave the CLS token instead.
        """
        return [
            caption
            for _, caption in self.iter_captions(images, beams, batch_size, None, attention, **generation)
        ]

    def __repr__(self) -> str:
        return f"CaptionPipeline(source={self.source!r}, device={self.device}, generation={self.generation})"


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> CaptionPipeline:
    """A CaptionPipeline from a caption run's Lightning checkpoint or an exported captioner directory.
    device: "cpu", "cuda", … (default: cuda when available)."""
    model, hparams = load_captioner(path)
    return CaptionPipeline(model, hparams.get("generation"), device, source=str(path))
