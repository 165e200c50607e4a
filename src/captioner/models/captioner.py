"""GPT-2 that reads images: CLIP tokens → projection → gated cross-attention after every k-th GPT-2 block.

Shapes: B batch, T caption length, C n_embd, nh heads, hs head size, N image tokens.

Flamingo's trick makes the new layers safe to insert into a trained LM: each adds its output through
tanh(gate) with the gate initialised to 0, so at initialisation the captioner computes exactly the LM's logits,
and training opens the gates only as far as the images help.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.models import decoding
from captioner.models.gpt import GPT, MLP, KVCache
from captioner.models.vision import VisionEncoder
from captioner.tokenizer import EOT

PARTS = ("xattn", "projection", "vision", "lm")


class GatedCrossAttention(nn.Module):
    """Pre-LN cross-attention (text queries, image keys/values) and an MLP, each behind a tanh gate (names as
    OpenFlamingo's `attn_gate` / `ff_gate`)."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"GatedCrossAttention: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
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
        """x (B, T, C) text stream, context (B, N, C) image tokens → (B, T, C). With a cache the image keys and
        values are computed on the first call and reused afterwards (stored under `layer`)."""
        B, T, C = x.size()
        q = self.c_q(self.ln_1(x)).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None and layer in cache.cross_attn:
            k, v = cache.cross_attn[layer]  # (B, nh, N, hs) each
        else:
            k, v = self.image_kv(context)
            if cache is not None:
                cache.cross_attn[layer] = (k, v)
        y = F.scaled_dot_product_attention(
            q, k, v
        )  # (B, nh, T, hs): every text position sees every image token
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        x = x + self.attn_gate.tanh() * self.c_proj(y)  # (B, T, C)
        x = x + self.ff_gate.tanh() * self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class Captioner(nn.Module):
    """A GPT-2 LM with GatedCrossAttention after every `cross_every`-th block, reading VisionEncoder tokens.

    `trainable` is the freeze policy applied at construction (see `set_trainable`); the default trains only
    the new layers, the cross-attention and the projection.
    """

    def __init__(
        self,
        lm: GPT,
        vision: VisionEncoder,
        cross_every: int = 2,
        trainable: Iterable[str] = ("xattn", "projection"),
    ):
        super().__init__()
        if vision.proj[0].out_features != lm.config.n_embd:
            raise ValueError(
                f"VisionEncoder projects to {vision.proj[0].out_features}, but the LM's n_embd is {lm.config.n_embd}"
            )
        self.lm = lm
        self.vision = vision
        self.lm.insert_cross_attention(
            cross_every, lambda i: GatedCrossAttention(lm.config.n_embd, lm.config.n_head)
        )
        self.set_trainable(trainable)

    def image_context(
        self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected image tokens (B, N, C) from pixels (B, 3, H, W) or cached CLIP features (B, N, D)."""
        return self.vision(pixel_values=pixel_values, features=features)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids (B, T); labels (B, T) aligned to input_ids (the next token, -100 on padding).
        Returns logits (B, T, V) (None with return_logits=False, see GPT.forward) and the caption loss (or None)."""
        context = self.image_context(pixel_values, features)  # (B, N, C)
        return self.lm(input_ids, labels, context=context, return_logits=return_logits)

    # --- freeze policy ------------------------------------------------------------------------------------
    def _part_parameters(self, part: str) -> list[nn.Parameter]:
        if part == "xattn":
            return list(self.lm.cross.parameters())
        if part == "projection":
            return list(self.vision.proj.parameters())
        if part == "vision":
            return self.vision.clip_parameters()
        if part == "lm":
            return [p for name, p in self.lm.named_parameters() if not name.startswith("cross.")]
        raise ValueError(f"unknown trainable part {part!r}; valid parts: {', '.join(PARTS)}")

    def set_trainable(self, parts: Iterable[str]) -> dict[str, int]:
        """Train only `parts` (from "xattn", "projection", "vision", "lm"); freeze the rest.
        Returns {"trainable": n, "frozen": n} parameter counts."""
        chosen = {id(p) for part in parts for p in self._part_parameters(part)}
        for p in self.parameters():
            p.requires_grad_(id(p) in chosen)
        self.vision.train(self.vision.training)  # re-applies "frozen CLIP stays in eval mode"
        return self.parameter_counts()

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    # --- captioning ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        *,
        method: str = "greedy",
        max_new_tokens: int = 30,
        num_beams: int = 3,
        length_penalty: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Caption token ids per image (EOT excluded), decoded from the prompt [EOT] as in training, where a
        sequence is [EOT] + caption + [EOT]. method: "greedy", "beam" or "sample"."""
        context = self.image_context(pixel_values, features)  # (B, N, C)
        prompt = torch.full((context.size(0), 1), EOT, dtype=torch.long, device=context.device)  # (B, 1)
        common = dict(max_new_tokens=max_new_tokens, eot=EOT, context=context, use_cache=use_cache)
        if method == "greedy":
            return decoding.greedy(self.lm, prompt, **common)
        if method == "beam":
            return decoding.beam_search(
                self.lm, prompt, num_beams=num_beams, length_penalty=length_penalty, **common
            )
        if method == "sample":
            return decoding.sample(
                self.lm,
                prompt,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                **common,
            )
        raise ValueError(f"unknown decoding method {method!r}; choose greedy, beam or sample")
