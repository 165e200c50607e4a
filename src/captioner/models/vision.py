"""Images in, image tokens out: decoding image files, CLIP's preprocessing, and the CLIP vision tower + projection
into the LM's width whose tokens the captioner's cross-attention reads.

Shapes: B images, N image tokens (CLS + patches; 50 for ViT-B/32 at 224 px), D CLIP width, C LM width.
"""

from __future__ import annotations

import os
import warnings
from typing import IO
from unittest import mock

import torch
import torch.nn as nn
from PIL import Image

from captioner.errors import UserError, from_hub

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# why an image could not be decoded; the server answers each with its own status code
REASONS = {
    "missing": "no such file",
    "not_an_image": "not an image (unknown format)",
    "truncated": "corrupt or truncated image",
    "too_many_pixels": "too many pixels",
}


class UnreadableImage(UserError):
    """An image that cannot be decoded: `reason` is a key of REASONS, `name` the file or upload it is."""

    def __init__(self, name: str, reason: str, detail: str = ""):
        self.name, self.reason = name, reason
        super().__init__(f"{name}: {REASONS[reason]}" + (f" ({detail})" if detail else ""))


def open_image(source: str | os.PathLike | IO[bytes], name: str | None = None) -> Image.Image:
    """Decode an image file (path or binary file object) fully into RGB, or raise UnreadableImage.

    It says what went wrong, so the server can answer a truncated upload differently from a bomb. PIL only warns
    between MAX_IMAGE_PIXELS and twice that; the warning is raised so that bombs are refused at the limit itself.
    """
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()  # Image.open reads only the header: truncation shows up here
                return to_rgb(img)
    except (FileNotFoundError, IsADirectoryError):
        raise UnreadableImage(name, "missing") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(name, "not_an_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnreadableImage(name, "too_many_pixels", str(err).rstrip(".")) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise UnreadableImage(name, "truncated", f"{type(err).__name__}: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited on white: what transformers' `convert_to_rgb` (CLIPImageProcessor's first
    step) does, where `convert("RGB")` would keep whatever colour transparent pixels happen to hold."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image | None:
    """`open_image`, or None for an image that cannot be read: training and evaluation skip (and count) those."""
    try:
        return open_image(path)
    except UnreadableImage:
        return None


def clip_transform(image_size: int = 224):
    """CLIP's preprocessing: RGB (transparency on white), shortest side to `image_size` (bicubic, antialiased),
    centre crop, [0, 1] floats, CLIP mean/std. PIL image in, plain (3, S, S) float32 tensor out."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Lambda(to_rgb, Image.Image),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            # OpenAI clip.py's crop (offset round(d/2)), the one CLIP's weights were published with; HF floors d/2
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
            v2.ToPureTensor(),
        ]
    )


class ClipPreprocess:
    """An image file (or a PIL image) → CLIP-preprocessed (3, S, S) float32 tensor; None for a file that cannot be
    read. The one way images enter the model: training data, the feature cache and captioning all use it."""

    def __init__(self, image_size: int = 224):
        self.image_size = image_size
        self.transform = clip_transform(image_size)

    def __call__(self, image: Image.Image | str | os.PathLike) -> torch.Tensor | None:
        if not isinstance(image, Image.Image):
            image = load_image(image)
            if image is None:
                return None
        return self.transform(image)  # (3, S, S)


# What a full CLIP checkpoint (openai/clip-vit-base-patch32) holds besides the vision tower.
CLIP_TEXT_KEYS = (r"^text_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$")


def load_clip_vision(name: str, what: str = "clip") -> nn.Module:
    """The CLIPVisionModel of a hub name or local directory holding it or a full CLIPModel (a UserError naming
    the config value `what` when there is none). Transformers' load report then lists only keys outside the
    full model's text tower, which it would otherwise print line by line (two hundred for ViT-B/32)."""
    from transformers import CLIPVisionModel

    ignored = (*(CLIPVisionModel._keys_to_ignore_on_load_unexpected or ()), *CLIP_TEXT_KEYS)
    # Read by the instance under construction (post_init copies it), so the patch only spans this load.
    with mock.patch.object(CLIPVisionModel, "_keys_to_ignore_on_load_unexpected", ignored):
        return from_hub(CLIPVisionModel.from_pretrained, name, what)


def token_parameters(clip: nn.Module) -> list[nn.Parameter]:
    """A CLIPVisionModel's parameters that shape its output tokens: all but the post-LayerNorm, which feeds only
    the pooled vector we never use (trained, it would get no gradient and leave DDP waiting for one)."""
    return [p for name, p in clip.named_parameters() if "post_layernorm" not in name]


class VisionEncoder(nn.Module):
    """`transformers.CLIPVisionModel` (all N output tokens, not only the pooled one) → Linear → LayerNorm.

    clip: a hub name ("openai/clip-vit-base-patch32") or a local `save_pretrained` directory.
    clip_config: kwargs of a `CLIPVisionConfig` for a randomly initialised CLIP instead (tests, the demo).

    While CLIP is frozen (no parameter requires grad) it runs under no_grad and stays in eval mode even when
    the module is put in train mode, so its outputs match the feature cache's.
    """

    def __init__(
        self,
        out_dim: int,
        clip: str | None = "openai/clip-vit-base-patch32",
        clip_config: dict | None = None,
    ):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if clip_config is not None:
            self.clip = CLIPVisionModel(CLIPVisionConfig(**clip_config))
        elif clip:
            self.clip = load_clip_vision(clip)
        else:
            raise UserError("VisionEncoder needs `clip` (hub name or local dir) or `clip_config`")
        self.proj = nn.Sequential(nn.Linear(self.hidden_size, out_dim), nn.LayerNorm(out_dim))

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.clip.config.image_size

    @property
    def num_tokens(self) -> int:
        """CLS + one token per patch."""
        return (self.clip.config.image_size // self.clip.config.patch_size) ** 2 + 1

    @property
    def clip_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.clip.parameters())

    def clip_parameters(self) -> list[nn.Parameter]:
        return token_parameters(self.clip)

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        if self.clip_frozen:
            self.clip.eval()  # frozen means fixed: no dropout, identical to the cached features
        return self

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W), CLIP-normalised → CLIP's last hidden state (B, N, D), every token."""
        dtype = next(self.clip.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.clip_frozen):
            return self.clip(pixel_values=pixel_values.to(dtype)).last_hidden_state  # (B, N, D)

    def forward(
        self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image tokens (B, N, C) from pixels (B, 3, H, W) or from precomputed `encode` outputs (B, N, D)."""
        if (pixel_values is None) == (features is None):
            raise UserError("VisionEncoder.forward takes exactly one of pixel_values or features")
        if features is None:
            features = self.encode(pixel_values)  # (B, N, D)
        return self.proj(features.to(self.proj[0].weight.dtype))  # (B, N, C)
