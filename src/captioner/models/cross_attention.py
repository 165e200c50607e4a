"""Flamingo-style gated cross-attention: the layer that lets a trained LM read image tokens without changing it.

Shapes: B batch, T text length, C n_embd, nh heads, hs head size, N image tokens.

Each sub-layer adds its output through tanh(gate) with the gate initialised to 0, so at initialisation the layer
is the identity and the LM computes exactly its own logits; training opens the gates only as far as images help.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.errors import UserError
from captioner.models.gpt import MLP
from captioner.models.kv_cache import KVCache


class GatedCrossAttention(nn.Module):
    """Pre-LN cross-attention (text queries, image keys/values) and an MLP, each behind a tanh gate (names as
    OpenFlamingo's `attn_gate` / `ff_gate`)."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head != 0:
            raise UserError(f"GatedCrossAttention: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.n_embd = n_embd
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_q = nn.Linear(n_embd, n_embd)
        self.c_kv = nn.Linear(n_embd, 2 * n_embd)  # keys and values of the image tokens in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)
        self.ff_gate = nn.Parameter(torch.zeros(1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)

    def image_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, N, C) → keys, values (B, nh, N, hs) each."""
        B, N, C = context.size()
        k, v = self.c_kv(context).split(self.n_embd, dim=2)  # (B, N, C) each
        k = k.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, N, hs)
        v = v.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, N, hs)
        return k, v

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, cache: KVCache | None = None, layer: int | None = None
    ) -> torch.Tensor:
        """x (B, T, C) text stream, context (B, N, C) image tokens → (B, T, C).

        With a cache, context holds one row per image, (B // cache.group, N, C): its keys/values are computed on
        the first call, stored under `layer` and reused afterwards; the group's rows (an image's beams) read them
        as one longer query block instead of each holding a copy."""
        B, T, C = x.size()
        q = self.c_q(self.ln_1(x)).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is None:
            k, v = self.image_kv(context)  # (B, nh, N, hs) each
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs): each text position sees all N
        else:
            k, v = cache.cached_image_kv(layer, lambda: self.image_kv(context))  # (I, nh, N, hs), I = B // G
            G, nh, hs = cache.group, self.n_head, C // self.n_head
            q = q.view(-1, G, nh, T, hs).transpose(1, 2).reshape(-1, nh, G * T, hs)  # (I, nh, G*T, hs)
            y = F.scaled_dot_product_attention(q, k, v)  # (I, nh, G*T, hs)
            y = y.view(-1, nh, G, T, hs).transpose(1, 2).reshape(B, nh, T, hs)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        x = x + self.attn_gate.tanh() * self.c_proj(y)  # (B, T, C)
        x = x + self.ff_gate.tanh() * self.mlp(self.ln_2(x))  # (B, T, C)
        return x
