"""Captioner model: zero-gate equality with the LM, gates, freeze policy, CLIP frozen behaviour, features path,
caption_batch (the one tensors → text path) and its device and precision handling."""

import dataclasses

import pytest
import torch

from captioner.models.captioner import Captioner, build_captioner, caption_batch, load_captioner
from captioner.models.cross_attention import GatedCrossAttention
from captioner.models.gpt import GPT, GPTConfig
from captioner.models.vision import VisionEncoder
from captioner.optim import parameter_counts
from tests.helpers import TINY_CLIP


def make_captioner(cross_every: int = 1, **kwargs) -> Captioner:
    lm = GPT(GPTConfig.named("tiny"))
    return Captioner(lm, VisionEncoder(32, clip_config=TINY_CLIP), cross_every, **kwargs)


def open_gates(model: Captioner, value: float = 0.5) -> None:
    with torch.no_grad():
        for layer in model.lm.cross.values():
            layer.attn_gate.fill_(value)
            layer.ff_gate.fill_(value)


def batch(B: int = 2, T: int = 10):
    idx = torch.randint(0, 50257, (B, T))
    labels = torch.randint(0, 50257, (B, T))
    labels[:, -3:] = -100
    return idx, labels, torch.randn(B, 3, 64, 64)


def test_zero_gates_reproduce_the_language_model_exactly():
    torch.manual_seed(0)
    lm = GPT(GPTConfig.named("tiny"))
    idx, labels, pixels = batch()
    with torch.no_grad():
        lm_logits, lm_loss = lm(idx, labels)
    model = Captioner(lm, VisionEncoder(32, clip_config=TINY_CLIP), cross_every=1)
    assert len(model.lm.cross) == 2
    with torch.no_grad():
        logits, loss = model(idx, labels, pixel_values=pixels)
    assert torch.equal(logits, lm_logits)
    assert torch.equal(loss, lm_loss)


@pytest.mark.parametrize("gate", ["attn_gate", "ff_gate"])
def test_an_open_gate_lets_the_image_in(gate):
    torch.manual_seed(0)
    model = make_captioner()
    idx, _, pixels = batch()
    with torch.no_grad():
        closed, _ = model(idx, pixel_values=pixels)
        getattr(model.lm.cross["0"], gate).fill_(0.5)
        opened, _ = model(idx, pixel_values=pixels)
        other_image, _ = model(idx, pixel_values=torch.randn_like(pixels))
    assert not torch.allclose(closed, opened)
    if gate == "attn_gate":  # the MLP alone never sees the image; attention does
        assert not torch.allclose(opened, other_image)


def test_gated_cross_attention_shapes_and_cached_image_kv():
    from captioner.models.gpt import KVCache

    layer = GatedCrossAttention(32, 4)
    with torch.no_grad():
        layer.attn_gate.fill_(1.0)
    x, context = torch.randn(6, 5, 32), torch.randn(2, 7, 32)
    expected = layer(x, context.repeat_interleave(3, dim=0))  # each of 6 rows with its own copy of its image
    cache = KVCache(8, group=3)  # 2 images x 3 beams: one (k, v) per image, shared by its beams
    out = layer(x, context, cache=cache, layer=3)
    assert out.shape == (6, 5, 32)
    assert cache.cross_attn[3][0].shape == (2, 4, 7, 8)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # a later step reuses the stored image keys/values, whatever context it is handed
    torch.testing.assert_close(layer(x, torch.zeros_like(context), cache=cache, layer=3), out)
    with pytest.raises(ValueError, match=r"n_embd \(32\) must be divisible by n_head \(5\)"):
        GatedCrossAttention(32, 5)


@pytest.mark.parametrize("parts", [["xattn", "projection"], ["xattn", "projection", "vision"], ["lm"]])
def test_freeze_policy_only_chosen_parts_learn(parts):
    torch.manual_seed(0)
    model = make_captioner(cross_every=2)
    counts = model.set_trainable(parts)
    open_gates(model)
    total = sum(p.numel() for p in model.parameters())
    assert counts == parameter_counts(model)
    assert counts["trainable"] + counts["frozen"] == total
    assert counts["trainable"] == sum(p.numel() for part in parts for p in model._part_parameters(part))

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model.train()
    idx, labels, pixels = batch()
    _, loss = model(idx, labels, pixel_values=pixels)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name, p in model.named_parameters() if p.requires_grad}


def test_default_policy_trains_cross_attention_and_projection():
    model = make_captioner()
    trainable = {
        name.split(".")[0] + "." + name.split(".")[1]
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"lm.cross", "vision.proj"}


def test_unknown_part_is_rejected():
    model = make_captioner()
    with pytest.raises(
        ValueError, match=r"unknown trainable part 'decoder'; valid parts: xattn, projection, vision, lm"
    ):
        model.set_trainable(["xattn", "decoder"])


def test_frozen_clip_stays_in_eval_mode_without_grad():
    model = make_captioner()
    model.train()
    assert not model.vision.clip.training and model.vision.proj.training
    pixels = torch.randn(2, 3, 64, 64)
    features = model.vision.encode(pixels)
    assert features.shape == (2, 17, 32) and not features.requires_grad

    model.set_trainable(["vision", "projection"])
    model.train()
    assert model.vision.clip.training
    assert model.vision.encode(pixels).requires_grad
    model.set_trainable(["projection"])  # freezing again puts CLIP back in eval mode at once
    assert not model.vision.clip.training


def test_features_path_equals_pixel_path():
    torch.manual_seed(0)
    model = make_captioner().eval()
    open_gates(model)
    idx, labels, pixels = batch()
    with torch.no_grad():
        features = model.vision.encode(pixels)  # what the feature cache stores
        from_pixels = model(idx, labels, pixel_values=pixels)
        from_features = model(idx, labels, features=features)
        from_fp16 = model.vision(features=features.half())
    assert torch.equal(from_pixels[0], from_features[0]) and torch.equal(from_pixels[1], from_features[1])
    assert from_fp16.dtype == torch.float32
    with pytest.raises(ValueError, match="exactly one of pixel_values or features"):
        model.vision(pixel_values=pixels, features=features)


def test_caption_batch_captions_pixels_and_features_as_the_captioner_does():
    torch.manual_seed(0)
    model = make_captioner().eval()
    open_gates(model)
    pixels = torch.randn(3, 3, 64, 64)
    settings = {"method": "beam", "num_beams": 2, "max_new_tokens": 6}
    expected = model.caption(pixels, **settings)
    assert caption_batch(model, pixels, **settings) == expected
    assert caption_batch(model, features=model.vision.encode(pixels), **settings) == expected
    assert caption_batch(model, pixels, autocast=False, **settings) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_caption_batch_moves_images_to_the_model_and_runs_it_in_bf16_or_in_the_callers_precision(monkeypatch):
    torch.manual_seed(0)
    model = make_captioner().eval().cuda()
    seen, real = [], Captioner.caption  # (images' device type, CUDA autocast on, its dtype) per model call

    def caption(self, pixel_values=None, features=None, **generation):
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        seen.append((pixel_values.device.type, *autocast))
        return real(self, pixel_values, features, **generation)

    monkeypatch.setattr(Captioner, "caption", caption)
    pixels = torch.randn(2, 3, 64, 64)  # on the CPU
    assert len(caption_batch(model, pixels, max_new_tokens=4)) == 2
    with torch.autocast("cuda", dtype=torch.float16):  # Lightning's 16-mixed, say: kept, not switched off
        caption_batch(model, pixels, autocast=False, max_new_tokens=4)
    caption_batch(model, pixels, autocast=False, max_new_tokens=4)
    assert seen[:2] == [("cuda", True, torch.bfloat16), ("cuda", True, torch.float16)]
    assert seen[2][:2] == ("cuda", False)


def test_vision_encoder_loads_a_local_clip_dir(tmp_path):
    torch.manual_seed(0)
    built = VisionEncoder(48, clip_config=TINY_CLIP)
    built.clip.save_pretrained(tmp_path)
    loaded = VisionEncoder(48, clip=str(tmp_path))
    assert (loaded.hidden_size, loaded.image_size, loaded.num_tokens) == (32, 64, 17)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(pixels), built.eval().encode(pixels))
    assert loaded(pixel_values=pixels).shape == (1, 17, 48)


def test_projection_width_must_match_the_lm():
    with pytest.raises(ValueError, match="projects to 48, but the LM's n_embd is 32"):
        Captioner(GPT(GPTConfig.named("tiny")), VisionEncoder(48, clip_config=TINY_CLIP))


def test_load_captioner_reads_caption_checkpoints_old_and_new(tmp_path):
    """A caption run's checkpoint rebuilds the same captioner with no LightningModule; hyper-parameters that
    older checkpoints carried (metrics_backend, gallery_size) are ignored, and a stage-1 checkpoint is refused."""
    torch.manual_seed(0)
    lm = {"config": dataclasses.asdict(GPTConfig.named("tiny"))}
    vision = {"clip": None, "clip_config": TINY_CLIP}
    model = build_captioner(lm, vision, cross_every=1)
    with torch.no_grad():
        for cross in model.lm.cross.values():  # open the gates, so the image matters
            cross.attn_gate.fill_(1.0)
    hparams = {"lm": lm, "vision": vision, "cross_every": 1, "trainable": ["xattn"], "generation": {}}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for extra in ({}, {"metrics_backend": "auto", "gallery_size": 24}):
        torch.save({"hyper_parameters": {**hparams, **extra}, "state_dict": state}, tmp_path / "c.ckpt")
        loaded, saved = load_captioner(tmp_path / "c.ckpt")
        assert saved["cross_every"] == 1 and not loaded.training
        pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(0, 50257, (2, 5))
        torch.testing.assert_close(
            loaded(ids, pixel_values=pixels)[0], model.eval()(ids, pixel_values=pixels)[0], atol=0, rtol=0
        )
    stage1 = {"hyper_parameters": {"gpt": lm["config"]}, "state_dict": {}}
    torch.save(stage1, tmp_path / "lm.ckpt")
    with pytest.raises(ValueError, match=r"lm\.ckpt: a stage-1 \(language model\) checkpoint.*caption run"):
        load_captioner(tmp_path / "lm.ckpt")


def test_caption_loss_without_logits_skips_padding_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = make_captioner(cross_every=1)
    open_gates(model)
    idx = torch.randint(0, 50257, (3, 9))
    labels = torch.randint(0, 50257, (3, 9))
    labels[1, 4:] = -100
    labels[2, 7:] = -100
    pixels = torch.randn(3, 3, 64, 64)
    _, loss = model(idx, labels, pixel_values=pixels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # with the count of targets known (the collate's n_targets), the rows are selected without a device read
    for n_targets in (None, int((labels != -100).sum())):
        model.zero_grad()
        logits, fused = model(idx, labels, pixel_values=pixels, return_logits=False, n_targets=n_targets)
        fused.backward()
        assert logits is None
        torch.testing.assert_close(fused, loss)
        for name, p in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4, msg=name)
