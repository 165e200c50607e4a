"""The keys and values a decoder keeps between steps, so each step feeds only its new token.

Shapes: B batch (rows: images × beams), nh heads, hs head size, N image tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values kept between decoding steps.

    `self_attn[layer]`: the self-attention (k, v) of every position fed so far, each (B, nh, length, hs).
    `cross_attn[layer]`: the cross-attention (k, v) of the image tokens, each (B, nh, N, hs); they depend on the
    image only, so they are computed on the first step and reused for every later one.
    `length`: how many positions have been fed; the next token's position.

    Tensors are replaced, never written in place, so a tensor handed out earlier never changes under its holder.
    """

    def __init__(self):
        self.self_attn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross_attn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's (B, nh, T, hs) keys/values for `layer`; return all of them, (B, nh, length + T, hs)."""
        if layer in self.self_attn:
            past_k, past_v = self.self_attn[layer]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.self_attn[layer] = (k, v)
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (LongTensor of shape (B',)), in that order: beam search's parent beams."""
        for store in (self.self_attn, self.cross_attn):
            for layer, (k, v) in store.items():
                store[layer] = (k.index_select(0, index), v.index_select(0, index))
