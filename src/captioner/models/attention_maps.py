"""Where the captioner looked: each caption token's cross-attention over the image tokens, as an image grid.

Shapes: B images, T caption tokens, L cross-attention layers, nh heads, hs head size, N image tokens (CLS first,
then H*W patches in reading order: 1 + 7*7 for ViT-B/32 at 224 px, 1 + 3*3 for the shapes world's stand-in CLIP).

The maps come from one teacher-forced pass over captions already decoded, so decoding and training keep their
fused SDPA kernels and pay nothing: forward pre-hooks on each GatedCrossAttention see the layer's input and
recompute its attention weights, softmax(q kᵀ / √hs), from the layer's own ln_1 / c_q / c_kv. The map of
caption token t is the attention of the position that emitted it (the one fed caption[t-1], or the prompt EOT
for t = 0), as in Show, Attend and Tell: the attention that was in play when the word was chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from captioner.models.cross_attention import GatedCrossAttention
from captioner.tokenizer import EOT, gpt2_encoding


@dataclass(frozen=True)
class AttentionMaps:
    """One caption's attention over its image.

    tokens: the T caption tokens as text, leading spaces kept ("".join(tokens).strip() is the decoded caption).
    patches: (T, H, W) float32, token t's attention over the patch grid, renormalised to sum to 1 over the
        patches (so maps compare across tokens whatever share the CLS token took).
    cls: (T,) float32, the share of token t's attention on the CLS token (before the renormalisation).
    """

    tokens: list[str]
    patches: np.ndarray
    cls: np.ndarray

    def to_dict(self) -> dict:
        """Plain lists, for JSON: {"tokens": [T], "attention": [T][H][W], "cls": [T]}."""
        return {"tokens": list(self.tokens), "attention": self.patches.tolist(), "cls": self.cls.tolist()}

    @classmethod
    def from_dict(cls, record: dict) -> AttentionMaps:
        """The maps of a `to_dict` record (extra keys, such as a caption, are ignored)."""
        return cls(
            tokens=list(record["tokens"]),
            patches=np.asarray(record["attention"], dtype=np.float32),  # (T, H, W)
            cls=np.asarray(record["cls"], dtype=np.float32),  # (T,)
        )


def cross_attention_weights(
    layer: GatedCrossAttention, x: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """The attention probabilities `layer` applies to x (B, T, C) over context (B, N, C): (B, nh, T, N) float32."""
    B, T, C = x.size()
    N, nh = context.size(1), layer.n_head
    q = layer.c_q(layer.ln_1(x)).view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
    k = layer.c_kv(context)[..., :C].view(B, N, nh, C // nh).transpose(1, 2)  # (B, nh, N, hs): keys only
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(C // nh)  # (B, nh, T, N)
    return F.softmax(scores, dim=-1)  # (B, nh, T, N)


def layer_weights(layers: list[GatedCrossAttention]) -> torch.Tensor:
    """(L,) weights summing to 1: each layer's |tanh(attn_gate)|, how much of its attention output reaches the
    text stream (a gate may train negative; its sign flips the output, not what was read). A nearly closed layer
    writes little of what it read, and its maps are noise to the caption. Equal weights while every gate is
    still closed (an untrained captioner)."""
    gates = torch.cat([layer.attn_gate.detach().float().tanh().abs() for layer in layers])  # (L,)
    if gates.sum() == 0:
        return torch.full_like(gates, 1 / len(gates))
    return gates / gates.sum()


@torch.no_grad()
def teacher_forced_attention(
    model, captions: list[list[int]], pixel_values=None, features=None
) -> tuple[torch.Tensor, list[GatedCrossAttention]]:
    """Every cross-attention layer's weights for the captions (token ids, EOT excluded, one list per image):
    (L, B, nh, T, N) float32, T the longest caption (shorter ones padded after their end, which causal
    attention keeps from changing anything before it), and the layers in the LM's order."""
    context = model.image_context(pixel_values, features)  # (B, N, C)
    T = max(1, max(len(ids) for ids in captions))
    fed = torch.full((len(captions), T), EOT, dtype=torch.long, device=context.device)  # (B, T)
    for b, ids in enumerate(captions):
        fed[b, 1 : len(ids)] = torch.tensor(ids[:-1], dtype=torch.long)  # position t emits caption[t]
    layers = [model.lm.cross[key] for key in sorted(model.lm.cross, key=int)]
    captured: dict[int, torch.Tensor] = {}

    def capture(i):
        def hook(layer, args):
            captured[i] = cross_attention_weights(layer, args[0], args[1])  # (B, nh, T, N)

        return hook

    handles = [layer.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        model.lm.hidden_states(fed, context=context)  # the output layer is not needed: skipped
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in range(len(layers))]), layers


def attention_maps(model, captions: list[list[int]], pixel_values=None, features=None) -> list[AttentionMaps]:
    """Per image, where each token of its caption looked: `AttentionMaps` (tokens, (T, H, W) patch maps, (T,)
    CLS shares). captions: token ids as `Captioner.generate` returns them; images as pixels (B, 3, S, S) or
    cached CLIP features (B, N, D), one per caption. The weights are averaged over heads, then over layers
    weighted by `layer_weights`; the patches are renormalised after that average, so a head that mostly reads
    CLS adds little patch mass instead of having its leftover spread amplified."""
    if not captions:
        return []
    weights, layers = teacher_forced_attention(model, captions, pixel_values, features)  # (L, B, nh, T, N)
    mixed = torch.einsum(
        "l,lbtn->btn", layer_weights(layers).to(weights.device), weights.mean(2)
    )  # (B, T, N)
    side = math.isqrt(mixed.size(-1) - 1)
    if side * side != mixed.size(-1) - 1:
        raise ValueError(f"{mixed.size(-1)} image tokens are not CLS + a square grid of patches")
    cls = mixed[..., 0]  # (B, T)
    patches = mixed[..., 1:] / mixed[..., 1:].sum(-1, keepdim=True)  # (B, T, H*W)
    patches = patches.view(*patches.shape[:2], side, side).cpu().numpy()  # (B, T, H, W)
    cls = cls.cpu().numpy()
    encoding = gpt2_encoding()
    return [
        AttentionMaps(
            tokens=[encoding.decode([t]) for t in ids],
            patches=patches[b, : len(ids)].astype(np.float32),
            cls=cls[b, : len(ids)].astype(np.float32),
        )
        for b, ids in enumerate(captions)
    ]


def overlay(image: Image.Image, grid: np.ndarray, side: int = 224, alpha: float = 0.5) -> Image.Image:
    """The square `side` x `side` centre of `image` (what CLIP's centre crop sees) with one map `grid` (H, W)
    upsampled bilinearly and blended on top in matplotlib's "jet" colours (red where the token looked most)."""
    from matplotlib import colormaps

    w, h = image.size
    crop = min(w, h)
    box = ((w - crop) // 2, (h - crop) // 2, (w - crop) // 2 + crop, (h - crop) // 2 + crop)
    base = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC, box=box)
    scaled = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-12)  # (H, W) in [0, 1]
    heat = np.asarray(
        Image.fromarray(scaled.astype(np.float32)).resize((side, side), Image.Resampling.BILINEAR)
    )
    colours = (colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.uint8)  # (side, side, 3)
    return Image.blend(base, Image.fromarray(colours), alpha)


def attention_strip(image: Image.Image, maps: AttentionMaps, side: int = 96) -> Image.Image:
    """One picture of a caption's maps: the image, then each token's `overlay`, the token as its title. What
    `captioner-caption --attention` writes and the wandb table shows."""
    title = 16
    tiles = [image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)]
    tiles += [overlay(image, grid, side=side) for grid in maps.patches]
    strip = Image.new("RGB", ((side + 4) * len(tiles), side + title), "white")
    draw = ImageDraw.Draw(strip)
    for k, (tile, label) in enumerate(zip(tiles, ["(image)", *maps.tokens])):
        strip.paste(tile, ((side + 4) * k, title))
        draw.text(((side + 4) * k + 2, 2), label.strip(), fill="black")
    return strip
