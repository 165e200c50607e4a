"""Attention maps: the recomputed weights are the ones the layer applies, token t's map is the attention of the
position that emitted it, batching and padding change nothing, and asking for maps changes no caption and leaves
no hook behind."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from captioner.models.attention_maps import (
    attention_maps,
    attention_strip,
    cross_attention_weights,
    layer_weights,
    overlay,
    teacher_forced_attention,
)
from captioner.tokenizer import decode
from tests.models.test_captioner import make_captioner, open_gates

SIDE = 4  # TINY_CLIP: 64 px images, 16 px patches


def trained_looking_captioner():
    model = make_captioner().eval()
    open_gates(model)
    with torch.no_grad():  # sharper attention than the 0.02-std init gives, so the maps are not all uniform
        for layer in model.lm.cross.values():
            layer.c_q.weight.mul_(40)
            layer.c_kv.weight.mul_(40)
    return model


def test_recomputed_weights_are_the_ones_the_layer_applies():
    model = trained_looking_captioner()
    layer = model.lm.cross["0"]
    x, context = torch.randn(2, 5, 32), torch.randn(2, 17, 32)
    with torch.no_grad():
        w = cross_attention_weights(layer, x, context)  # (B, nh, T, N)
        v = layer.c_kv(context)[..., 32:].view(2, 17, 2, 16).transpose(1, 2)  # (B, nh, N, hs)
        y = (w @ v).transpose(1, 2).reshape(2, 5, 32)  # (B, T, C)
        h = x + layer.attn_gate.tanh() * layer.c_proj(y)
        expected = h + layer.ff_gate.tanh() * layer.mlp(layer.ln_2(h))
        assert torch.allclose(layer(x, context), expected, atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 5))
    assert w.std() > 0.05  # not uniform: the check above would pass for any uniform attention otherwise


def test_maps_leave_captions_unchanged_and_no_hook_behind():
    model = trained_looking_captioner()
    pixels = torch.randn(3, 3, 64, 64)
    before = model.generate(pixels, method="greedy", max_new_tokens=6)
    maps = attention_maps(model, before, pixels)
    assert model.generate(pixels, method="greedy", max_new_tokens=6) == before
    assert all(not layer._forward_pre_hooks for layer in model.lm.cross.values())
    for ids, m in zip(before, maps):
        assert "".join(m.tokens).strip() == decode(ids)
        assert m.patches.shape == (len(ids), SIDE, SIDE) and m.cls.shape == (len(ids),)
        assert np.allclose(m.patches.sum((1, 2)), 1, atol=1e-5)
        assert ((m.cls > 0) & (m.cls < 1)).all()


def test_hooks_are_removed_when_the_pass_fails():
    model = trained_looking_captioner()
    with pytest.raises(ValueError, match="block_size"):  # raised inside the pass, after the hooks went on
        teacher_forced_attention(model, [[262] * 80], torch.randn(1, 3, 64, 64))
    assert all(not layer._forward_pre_hooks for layer in model.lm.cross.values())


def test_token_t_is_mapped_from_the_position_that_emitted_it():
    model = trained_looking_captioner()
    pixels = torch.randn(1, 3, 64, 64)
    caption = [262, 2266, 9197, 290]
    whole = attention_maps(model, [caption], pixels)[0].patches
    other_last = attention_maps(model, [[*caption[:3], 4171]], pixels)[0].patches
    other_third = attention_maps(model, [[*caption[:2], 4171, 290]], pixels)[0].patches
    # token t's map is read where caption[t - 1] was fed: changing token t leaves it, changing t - 1 does not
    assert np.allclose(whole, other_last, atol=1e-6)
    assert np.allclose(whole[:3], other_third[:3], atol=1e-6)
    assert not np.allclose(whole[3], other_third[3], atol=1e-3)
    # the first token's map is the prompt's (EOT at position 0), whatever the caption
    assert np.allclose(whole[0], attention_maps(model, [[257]], pixels)[0].patches[0], atol=1e-6)


def test_a_batch_with_padding_gives_each_image_its_own_maps():
    model = trained_looking_captioner()
    pixels = torch.randn(3, 3, 64, 64)
    captions = [[262, 2266, 9197, 290, 4171], [257], []]
    batched = attention_maps(model, captions, pixels)
    for i, ids in enumerate(captions):
        alone = attention_maps(model, [ids], pixels[i : i + 1])[0]
        assert alone.tokens == batched[i].tokens
        assert np.allclose(alone.patches, batched[i].patches, atol=1e-5)
        assert np.allclose(alone.cls, batched[i].cls, atol=1e-5)
    assert batched[2].patches.shape == (0, SIDE, SIDE)


def test_features_give_the_same_maps_as_pixels():
    model = trained_looking_captioner()
    pixels = torch.randn(2, 3, 64, 64)
    captions = [[262, 2266], [257, 9197, 290]]
    features = model.vision.encode(pixels)  # (B, N, D)
    for a, b in zip(
        attention_maps(model, captions, pixels), attention_maps(model, captions, features=features)
    ):
        assert np.allclose(a.patches, b.patches, atol=1e-5)


def test_layers_are_weighted_by_how_far_their_gate_is_open():
    model = make_captioner()
    layers = list(model.lm.cross.values())
    assert torch.allclose(layer_weights(layers), torch.tensor([0.5, 0.5]))  # closed: equal
    with torch.no_grad():
        layers[0].attn_gate.fill_(0.0)
        layers[1].attn_gate.fill_(-0.3)
    assert torch.allclose(layer_weights(layers), torch.tensor([0.0, 1.0]))
    pixels = torch.randn(1, 3, 64, 64)
    weights, _ = teacher_forced_attention(model, [[262, 2266]], pixels)  # (L, 1, nh, T, N)
    mixed = F.normalize(weights[1, 0].mean(0)[:, 1:], p=1, dim=-1).view(2, SIDE, SIDE)
    assert np.allclose(attention_maps(model, [[262, 2266]], pixels)[0].patches, mixed.numpy(), atol=1e-6)


def test_to_dict_is_plain_data():
    model = trained_looking_captioner()
    m = attention_maps(model, [[262, 2266]], torch.randn(1, 3, 64, 64))[0].to_dict()
    assert set(m) == {"tokens", "attention", "cls"}
    assert (
        len(m["attention"]) == 2
        and len(m["attention"][0]) == SIDE
        and isinstance(m["attention"][0][0][0], float)
    )


def test_overlay_is_hot_where_the_map_peaks_on_the_centre_crop():
    grid = np.zeros((3, 3), dtype=np.float32)
    grid[0, 2] = 1.0  # top right cell
    wide = Image.new("RGB", (300, 200), (128, 128, 128))  # the crop CLIP sees is the middle 200 x 200
    out = np.asarray(overlay(wide, grid, side=90)).astype(int)
    assert out.shape == (90, 90, 3)
    hot, cold = out[10, 80], out[80, 10]  # inside the top right and bottom left cells
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0] + 40  # jet: red at the peak, blue at the floor


def test_the_strip_shows_the_image_then_one_titled_overlay_per_token():
    model = trained_looking_captioner()
    maps = attention_maps(model, [[262, 2266, 9197]], torch.randn(1, 3, 64, 64))[0]
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    strip = attention_strip(image, maps, side=40)
    assert strip.size == (4 * 44, 40 + 16)
    pixels = np.asarray(strip)
    assert (pixels[16:, :40] == (200, 30, 30)).all()  # the image itself, untouched, first
    assert (pixels[:16, 44:84] < 128).any()  # a title above the first overlay


def test_caption_batch_with_attention_is_caption_batch_plus_the_maps():
    from captioner.models.captioner import caption_batch, caption_batch_with_attention

    model = trained_looking_captioner()
    pixels = torch.randn(3, 3, 64, 64)
    for generation in ({"method": "greedy"}, {"method": "beam", "num_beams": 3}):
        captions, maps = caption_batch_with_attention(model, pixels, max_new_tokens=6, **generation)
        assert captions == caption_batch(model, pixels, max_new_tokens=6, **generation)
        ids = model.generate(pixels, max_new_tokens=6, **generation)
        for m, expected in zip(maps, attention_maps(model, ids, pixels)):
            assert m.tokens == expected.tokens
            assert np.allclose(m.patches, expected.patches, atol=1e-6)
