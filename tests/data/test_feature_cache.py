"""CLIP feature cache: values equal live CLIP, resumable, and served by the data module in place of pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.data.captions import CocoCaptionDataModule
from captioner.data.coco_format import load_captions
from captioner.data.feature_cache import FeatureStore, build_feature_cache
from captioner.errors import UserError
from captioner.models import vision
from captioner.models.vision import VisionEncoder, clip_transform, load_image
from captioner.prepare.coco import prepare_coco
from tests.data.test_captions import make_caption_root

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)  # N = (32 / 8)² + 1 = 17 tokens of D = 32


def tiny_encoder(seed: int = 0) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder(16, clip=None, clip_config=TINY_CLIP).requires_grad_(False)


@pytest.fixture
def root(tmp_path):
    make_caption_root(tmp_path / "data", "train", 6, first_id=1)
    root = make_caption_root(tmp_path / "data", "val", 5, first_id=101)
    (root / "val" / "000000000103.jpg").write_bytes(b"broken")  # cached as ok=false
    return root


class CountingEncoder:
    """Wraps an encoder, counts images encoded, and can fail on the k-th call (an interrupted run)."""

    def __init__(self, encoder, fail_on_call: int | None = None):
        self.encoder, self.fail_on_call, self.calls, self.images = encoder, fail_on_call, 0, 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, pixel_values):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        self.images += len(pixel_values)
        return self.encoder.encode(pixel_values)


def test_cache_equals_live_encoding(root, tmp_path):
    encoder = tiny_encoder()
    path = build_feature_cache(encoder, root, "val", tmp_path / "feats", image_size=32, batch_size=2)
    assert path == tmp_path / "feats" / "val.f16" and path.stat().st_size == 5 * 17 * 32 * 2
    meta = json.loads((tmp_path / "feats" / "val.json").read_text())
    assert meta["image_ids"] == [101, 102, 103, 104, 105] and meta["shape"] == [5, 17, 32]
    assert meta["dtype"] == "float16" and meta["ok"] == [True, True, False, True, True]
    assert meta["encoder"]["num_tokens"] == 17 and meta["encoder"]["hidden_size"] == 32

    store = FeatureStore(tmp_path / "feats", "val")
    index = load_captions(root, "val")
    ok = [i for i in range(5) if i != 2]
    pixels = torch.stack([clip_transform(32)(load_image(index.image_path(i))) for i in ok])
    with torch.no_grad():
        live = encoder.encode(pixels)  # (4, 17, 32), one batch instead of the cache's pairs
    for row, i in enumerate(ok):
        cached = store.get(index.image_ids[i])
        assert cached.dtype == np.float16 and cached.shape == (17, 32)
        torch.testing.assert_close(torch.from_numpy(cached).float(), live[row], atol=2e-3, rtol=2e-3)
    assert store.get(103) is None and 103 in store and 999 not in store


def test_interrupted_build_resumes_to_the_same_file(root, tmp_path):
    encoder = tiny_encoder()
    reference = build_feature_cache(encoder, root, "val", tmp_path / "ref", image_size=32, batch_size=2)

    out = tmp_path / "feats"
    with pytest.raises(KeyboardInterrupt):  # dies in the third batch, after two batches were recorded
        failing = CountingEncoder(encoder, fail_on_call=3)
        build_feature_cache(failing, root, "val", out, image_size=32, batch_size=2, save_every=1)
    assert (
        not (out / "val.json").exists() and json.loads((out / "val.progress.json").read_text())["done"] == 4
    )
    resumed = CountingEncoder(encoder)
    build_feature_cache(resumed, root, "val", out, image_size=32, batch_size=2, save_every=1)
    assert resumed.images == 1  # only image 105 was left (103 is unreadable and never reaches the encoder)
    assert (out / "val.f16").read_bytes() == reference.read_bytes()
    assert json.loads((out / "val.json").read_text()) == json.loads(
        (tmp_path / "ref" / "val.json").read_text()
    )
    assert not (out / "val.progress.json").exists() and not (out / "val.f16.partial").exists()

    again = CountingEncoder(encoder)
    build_feature_cache(again, root, "val", out, image_size=32, batch_size=2)
    assert again.calls == 0  # finished: skipped
    other = CountingEncoder(tiny_encoder(seed=1))  # other weights: the cache no longer fits, rebuild
    build_feature_cache(other, root, "val", out, image_size=32, batch_size=2)
    assert other.images == 4 and (out / "val.f16").read_bytes() != reference.read_bytes()


def test_store_rejects_missing_and_damaged_caches(root, tmp_path):
    with pytest.raises(UserError, match="captioner-prepare coco --features"):
        FeatureStore(tmp_path / "nothing", "val")
    path = build_feature_cache(tiny_encoder(), root, "val", tmp_path / "feats", image_size=32, batch_size=4)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"val\.f16: 5430 bytes"):
        FeatureStore(tmp_path / "feats", "val")
    with pytest.raises(ValueError, match="image_size 224 differs"):
        build_feature_cache(tiny_encoder(), root, "val", tmp_path / "feats", image_size=224)


def test_data_module_serves_cached_features_without_decoding(root, tmp_path, monkeypatch):
    encoder = tiny_encoder()
    for split in ("train", "val"):
        build_feature_cache(encoder, root, split, tmp_path / "feats", image_size=32, batch_size=4)
    args = dict(train_split="train", val_split="val", batch_size=4, num_workers=0, image_size=32, seed=3)
    pixels = CocoCaptionDataModule(str(root), **args)
    pixels.setup("fit")
    expected = {"train": list(pixels.train_dataloader()), "val": list(pixels.val_dataloader()[0])}

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(vision, "load_image", no_decoding)
    cached = CocoCaptionDataModule(str(root), features_dir=str(tmp_path / "feats"), **args)
    cached.setup("fit")
    stores = {split: FeatureStore(tmp_path / "feats", split) for split in ("train", "val")}
    for split, loader in (("train", cached.train_dataloader()), ("val", cached.val_dataloader()[0])):
        batches = list(loader)
        assert len(batches) == len(expected[split])
        for got, want in zip(batches, expected[split], strict=True):
            assert "pixel_values" not in got and got["features"].shape == (len(got["image_ids"]), 17, 32)
            for key in ("input_ids", "labels", "image_ids"):
                assert torch.equal(got[key], want[key])
            assert got["skipped"] == want["skipped"]  # the unreadable val image is skipped in both modes
            for b, image_id in enumerate(got["image_ids"].tolist()):
                assert torch.equal(got["features"][b], torch.from_numpy(stores[split].get(image_id)).float())
    items = list(cached.generation_images())
    assert items and all(it["features"].shape == (17, 32) and "path" in it for it in items)
    generation = list(cached.val_dataloader()[1])  # the generation loader serves the same cached features
    assert torch.cat([b["image_ids"] for b in generation]).tolist() == [it["image_id"] for it in items]
    assert torch.equal(
        torch.cat([b["features"] for b in generation]), torch.stack([it["features"] for it in items])
    )

    (root / "annotations" / "captions_val.json").write_text(
        json.dumps(
            {
                "images": [{"id": 777, "file_name": "x.jpg"}],
                "annotations": [{"id": 1, "image_id": 777, "caption": "x"}],
            }
        )
    )
    stale = CocoCaptionDataModule(str(root), features_dir=str(tmp_path / "feats"), **args)
    with pytest.raises(ValueError, match=r"val\.json: no cached features for 1 image.*image_id 777"):
        stale.setup("validate")


def test_caption_loss_is_the_same_from_features_and_pixels(root, tmp_path):
    from captioner.models.captioner import Captioner
    from captioner.models.gpt import GPT, GPTConfig

    encoder = tiny_encoder()
    for split in ("train", "val"):
        build_feature_cache(encoder, root, split, tmp_path / "feats", image_size=32, batch_size=4)
    config = GPTConfig.named("tiny")
    torch.manual_seed(0)
    model = Captioner(GPT(config), VisionEncoder(config.n_embd, clip=None, clip_config=TINY_CLIP))
    model.vision.clip.load_state_dict(encoder.clip.state_dict())
    gates = [p for name, p in model.named_parameters() if name.endswith("_gate")]
    assert gates
    with torch.no_grad():
        for gate in gates:
            gate.fill_(1.0)  # open the gates, so the loss depends on the image
    args = dict(train_split="train", val_split="val", batch_size=6, num_workers=0, image_size=32, seed=3)
    batches = {}
    for mode, extra in (("pixels", {}), ("features", {"features_dir": str(tmp_path / "feats")})):
        dm = CocoCaptionDataModule(str(root), **args, **extra)
        dm.setup("fit")
        batches[mode] = next(iter(dm.train_dataloader()))
    model.eval()
    with torch.no_grad():
        pix, feat = batches["pixels"], batches["features"]
        _, loss_pixels = model(pix["input_ids"], pix["labels"], pixel_values=pix["pixel_values"])
        _, loss_features = model(feat["input_ids"], feat["labels"], features=feat["features"])
        _, loss_other = model(feat["input_ids"], feat["labels"], features=feat["features"].roll(1, 0))
    torch.testing.assert_close(loss_features, loss_pixels, atol=1e-4, rtol=1e-4)
    assert abs(loss_other - loss_pixels) > 1e-3  # the images matter, so the equality above means something


def test_prepare_coco_builds_the_cache_of_each_split(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    make_caption_root(tmp_path / "src", "train2017", 3, first_id=1)
    make_caption_root(tmp_path / "src", "val2017", 2, first_id=101)
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(tmp_path / "clip")
    clip = str(tmp_path / "clip")
    prepare_coco(tmp_path / "coco", source=tmp_path / "src", features=True, clip=clip, num_workers=0)
    for split, n in (("train2017", 3), ("val2017", 2)):
        store = FeatureStore(tmp_path / "coco" / "features", split)
        assert store.shape == (n, 17, 32) and all(store.ok)
        assert store.encoder["clip"] == str(tmp_path / "clip")
