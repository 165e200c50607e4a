"""`captioner.load(PATH).caption(...)`: the same captions as the Captioner itself, paths and PIL images
alike, the checkpoint's generation settings as defaults, `beams` overriding them, clear errors for unreadable
images, and with attention=True the same captions with a map per token."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import captioner
from captioner.api import CaptionPipeline
from captioner.models.captioner import (
    Captioner,
    build_captioner,
    caption_batch_with_attention,
    save_captioner,
)
from captioner.models.gpt import GPTConfig
from captioner.models.vision import ClipPreprocess, UnreadableImage, open_image
from tests.helpers import TINY_CLIP

GENERATION = {"method": "greedy", "max_new_tokens": 8}


def tiny_captioner(seed: int = 0) -> tuple[Captioner, dict]:
    """A tiny captioner whose captions differ from image to image, and its checkpoint hyper-parameters."""
    torch.manual_seed(seed)
    lm = {"config": dataclasses.asdict(GPTConfig.named("tiny"))}
    vision = {"clip": None, "clip_config": TINY_CLIP}
    model = build_captioner(lm, vision, cross_every=1)
    with torch.no_grad():  # freshly initialised, it answers EOT at once; noise gives it something to say
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hparams = {"lm": lm, "vision": vision, "cross_every": 1, "trainable": ["xattn"], "generation": GENERATION}
    return model.eval(), hparams


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """A caption run's checkpoint as Lightning saves it: plain-data hparams, weights under `model.`."""
    model, hparams = tiny_captioner(seed)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state, "global_step": 0}, path)
    return path


def noise_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(side: int) -> bytes:
    """A valid PNG header claiming side × side pixels in a few bytes: PIL refuses it on opening."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "last.ckpt")


@pytest.fixture(scope="module")
def pipeline(ckpt) -> CaptionPipeline:
    return captioner.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [noise_image(seed, size) for seed, size in enumerate([(96, 72), (64, 64), (50, 120), (200, 100)])]


def direct_captions(images: list[Image.Image], **generation) -> list[str]:
    model, _ = tiny_captioner()
    pixels = torch.stack([ClipPreprocess(64)(image) for image in images])
    return model.caption(pixel_values=pixels, **generation)


def test_load_is_lazy_and_light():
    code = (
        "import sys, captioner, captioner.tokenizer; assert 'torch' not in sys.modules, 'torch imported'; "
        "from captioner.api import load; assert captioner.load is load; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        captioner.lod  # noqa: B018


def test_the_api_captions_as_the_captioner_does_with_the_saved_settings(pipeline, images):
    assert pipeline.generation == GENERATION and pipeline.device == torch.device("cpu")
    assert not pipeline.model.training
    expected = direct_captions(images, **GENERATION)
    assert len(set(expected)) > 1 and all(expected), expected  # the images are told apart
    assert pipeline.caption(images) == expected
    info = pipeline.info()
    assert info["image_size"] == 64 and info["parameters"] > 0 and info["generation"] == GENERATION


def test_an_exported_directory_loads_like_its_checkpoint(pipeline, images, tmp_path):
    saved, hparams = tiny_captioner()
    save_captioner(saved, hparams, tmp_path)
    exported = captioner.load(tmp_path, device="cpu")
    assert exported.generation == GENERATION and exported.source == str(tmp_path)
    assert exported.caption(images, beams=2) == pipeline.caption(images, beams=2)


def test_paths_pil_images_and_mixes_give_the_same_captions(pipeline, images, tmp_path):
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    expected = pipeline.caption(images)
    assert pipeline.caption(paths) == expected
    assert pipeline.caption([str(p) for p in paths]) == expected
    assert pipeline.caption([paths[0], images[1], str(paths[2]), images[3]]) == expected
    assert pipeline.caption(paths[1]) == expected[1:2]  # one image needs no list
    assert pipeline.caption(io.BytesIO(image_bytes(images[2]))) == expected[2:3]  # nor does a binary file
    assert pipeline.caption(images, batch_size=3) == expected  # batches of 3 + 1
    assert pipeline.caption([]) == []


def test_beams_and_generation_keywords_override_the_saved_settings(pipeline, images):
    beam3 = direct_captions(images, method="beam", num_beams=3, max_new_tokens=8)
    assert pipeline.caption(images, beams=3) == beam3
    assert pipeline.caption(images, beams=1) == direct_captions(images, **GENERATION)
    short = pipeline.caption(images, max_new_tokens=2)
    assert short == direct_captions(images, method="greedy", max_new_tokens=2)
    assert pipeline.settings(beams=4) == {"method": "beam", "max_new_tokens": 8, "num_beams": 4}
    assert pipeline.generation == GENERATION  # overrides are per call
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(ValueError, match="beams must be a whole number"):
            pipeline.caption(images, beams=bad)


def test_a_checkpoint_without_a_method_decodes_with_beam_search_as_training_did(ckpt, images):
    model, _ = tiny_captioner()
    pipeline = CaptionPipeline(model, {"max_new_tokens": 8, "num_beams": 2}, device="cpu")
    assert pipeline.settings() == {"method": "beam", "max_new_tokens": 8, "num_beams": 2}
    assert pipeline.caption(images[:2]) == direct_captions(
        images[:2], method="beam", num_beams=2, max_new_tokens=8
    )


def test_unreadable_images_raise_a_value_error_naming_the_image(pipeline, images, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(image_bytes(images[3])[:2000])
    (tmp_path / "good.png").write_bytes(image_bytes(images[0]))
    cases = {
        tmp_path / "missing.jpg": "no such file",
        tmp_path / "notes.jpg": "not an image",
        tmp_path / "cut.png": "corrupt or truncated",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=f"{path.name}: {message}"):
            pipeline.caption([tmp_path / "good.png", path])


def test_open_image_says_why(images):
    assert open_image(io.BytesIO(image_bytes(images[0], "JPEG")), "a.jpg").size == images[0].size
    reasons = {
        image_bytes(images[3], "JPEG")[:800]: "truncated",
        b"hello": "not_an_image",
        image_bytes(images[3])[:500]: "truncated",
        bomb_png(12_000): "too_many_pixels",  # 144 M pixels: PIL would only warn
        bomb_png(20_000): "too_many_pixels",  # 400 M pixels: PIL raises
    }
    for data, reason in reasons.items():
        with pytest.raises(UnreadableImage) as caught:
            open_image(io.BytesIO(data), "upload")
        assert caught.value.reason == reason and str(caught.value).startswith("upload: ")


def test_iter_captions_yields_positions_and_hands_unreadable_images_to_its_callback(
    pipeline, images, tmp_path
):
    (tmp_path / "cut.png").write_bytes(image_bytes(images[3])[:2000])
    inputs = [images[0], tmp_path / "cut.png", images[1], images[2]]
    skipped = []
    captioned = list(pipeline.iter_captions(inputs, batch_size=2, on_unreadable=skipped.append))
    assert captioned == list(zip([0, 2, 3], pipeline.caption(images[:3]), strict=True))
    assert [(err.name, err.reason) for err in skipped] == [(str(tmp_path / "cut.png"), "truncated")]
    with pytest.raises(UnreadableImage, match=r"cut\.png"):
        list(pipeline.iter_captions(inputs))


def test_attention_gives_the_same_captions_with_a_patch_grid_per_token(pipeline, images):
    for beams in (None, 2):
        records = pipeline.caption(images, beams=beams, attention=True, batch_size=3)
        assert [r["caption"] for r in records] == pipeline.caption(images, beams=beams)
        for record in records:
            assert set(record) == {"caption", "tokens", "attention", "cls"}
            assert "".join(record["tokens"]).strip() == record["caption"]
            grids = np.array(
                record["attention"]
            )  # (T, H, W): 4 x 4 patches of 16 px in the tiny CLIP's 64 px
            assert grids.shape == (len(record["tokens"]), 4, 4) and len(record["cls"]) == len(grids)
            assert np.allclose(grids.sum((1, 2)), 1, atol=1e-5) and all(0 <= c <= 1 for c in record["cls"])
        assert json.loads(json.dumps(records)) == records  # plain lists: ready for JSON as they are
    # the maps are the model's own, image by image, and tell the images apart
    pixels = torch.stack([pipeline.preprocess(image) for image in images])  # (B, 3, S, S)
    _, maps = caption_batch_with_attention(pipeline.model, pixels, **pipeline.settings())
    for record, expected in zip(pipeline.caption(images, attention=True), maps, strict=True):
        assert np.allclose(record["attention"], expected.patches, atol=1e-6)
        assert np.allclose(record["cls"], expected.cls, atol=1e-6)
    assert not np.allclose(maps[0].patches[0], maps[1].patches[0])
    streamed = list(pipeline.iter_captions(images[:2], attention=True))
    assert [position for position, _ in streamed] == [0, 1] and all("attention" in r for _, r in streamed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_default_device_is_cuda(ckpt, images):
    pipeline = captioner.load(ckpt)
    assert pipeline.device.type == "cuda" and next(pipeline.model.parameters()).is_cuda
    captions = pipeline.caption(images, beams=3)
    assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)
