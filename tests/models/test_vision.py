"""CLIP preprocessing against its references (OpenAI's clip.py, transformers' CLIPImageProcessor), and loading the
vision tower from a full CLIP checkpoint without transformers' report of the text tower's keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from transformers import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from captioner.models.vision import (
    CLIP_MEAN,
    CLIP_STD,
    ClipPreprocess,
    VisionEncoder,
    load_clip_vision,
    open_image,
)

rng = np.random.default_rng(0)


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8), mode)


def openai_clip_py(image: Image.Image) -> torch.Tensor:
    """OpenAI clip.py's `_transform(224)`, rebuilt from torchvision's transforms as that file composes them."""
    return T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )(image)


def hf(processor, image: Image.Image) -> torch.Tensor:
    return processor(image, return_tensors="pt")["pixel_values"][0]


def palette_with_transparency() -> Image.Image:
    image = noise(224, 224).quantize(16)
    image.info["transparency"] = 3  # palette index 3 is transparent, as a GIF or palette PNG can say
    return image


@pytest.mark.parametrize(
    "image",
    [noise(224, 224, "RGBA"), noise(224, 224, "LA"), palette_with_transparency()],
    ids=["RGBA", "LA", "P+transparency"],
)
def test_transparency_is_composited_on_white_as_transformers_does(tmp_path, image):
    # 224 px square: no resize, no crop, so only the RGB conversion can differ.
    expected = hf(CLIPImageProcessor(), image)
    path = tmp_path / "upload.png"
    image.save(path)
    for ours in (ClipPreprocess()(image), ClipPreprocess()(path), ClipPreprocess()(open_image(path))):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # What keeping the colour under transparent pixels gives (the pixels alone: PIL keeps a transparency key).
    dropped = ClipPreprocess()(Image.fromarray(np.asarray(image.convert("RGB"))))
    assert (dropped - expected).abs().max() > 1


@pytest.mark.parametrize(("size", "axis"), [((227, 224), -1), ((640, 427), -1), ((427, 640), -2)])
def test_centre_crop_is_openai_clip_py_one_pixel_from_transformers(size, axis):
    """The resized long side minus 224 is 3 (mod 4) here (227; 335 for COCO's common 640x427): clip.py rounds
    half of it to even (2, 56), transformers floors it (1, 55). We keep clip.py's crop, the weights' own."""
    image = noise(*size)
    ours = ClipPreprocess()(image)
    torch.testing.assert_close(ours, openai_clip_py(image), atol=1e-6, rtol=0)
    theirs = hf(CLIPImageProcessorPil(), image)  # PIL resampling, as ours: only the crop differs
    assert (theirs - ours).abs().max() > 1
    # Their window starts one pixel before ours: their pixel i + 1 is our pixel i.
    n = ours.shape[axis]
    torch.testing.assert_close(theirs.narrow(axis, 1, n - 1), ours.narrow(axis, 0, n - 1), atol=1e-5, rtol=0)


def test_centre_crop_agrees_with_transformers_when_the_margin_is_even():
    image = noise(640, 480)  # resized to 298x224: a margin of 74, halved exactly by both
    torch.testing.assert_close(ClipPreprocess()(image), hf(CLIPImageProcessorPil(), image), atol=1e-5, rtol=0)


# --- loading the vision tower from a full CLIP checkpoint ---------------------------------------------------


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(**tower, vocab_size=49408, max_position_embeddings=8),
        vision_config=dict(**tower, image_size=32, patch_size=16),
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    path = tmp_path_factory.mktemp("clip") / "full"
    model.save_pretrained(path)
    return path, model


def test_a_full_clip_checkpoint_loads_its_vision_tower_without_a_load_report(full_clip, caplog):
    path, model = full_clip
    encoder = VisionEncoder(8, clip=str(path))
    assert "LOAD REPORT" not in caplog.text and "text_model" not in caplog.text, caplog.text
    for name, value in encoder.clip.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[f"vision_model.{name}"], msg=name)


def test_keys_outside_the_text_tower_are_still_reported(full_clip, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    path, _ = full_clip
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_bytes((path / "config.json").read_bytes())
    weights = load_file(path / "model.safetensors")
    save_file(
        {**weights, "mystery.weight": torch.zeros(2)}, odd / "model.safetensors", metadata={"format": "pt"}
    )
    load_clip_vision(str(odd))
    assert "LOAD REPORT" in caplog.text and "mystery.weight" in caplog.text, caplog.text
    assert "text_model" not in caplog.text
