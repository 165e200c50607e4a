"""GPT-2 as in build-nanogpt, plus the two things later stages need: KV-cache use and cross-attention slots.

Shapes: B batch, T sequence length, C n_embd, nh heads, hs head size (C // nh), V vocab size,
N image tokens (cross-attention context).

Parameter names are GPT-2's own (`wte wpe h ln_f c_attn c_fc c_proj`), so OpenAI's weights map onto this model
with nothing but a transpose of the Conv1D matrices (`GPT.from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.errors import UserError, from_hub
from captioner.models.kv_cache import KVCache
from captioner.models.loss import linear_cross_entropy

# --------------------------------------------------------------------------------------------------------------
# config


# transformers' GPT-2 activation_function → our GELU's `approximate`
GELUS = {"gelu_new": "tanh", "gelu": "none"}


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length (positions in wpe)
    vocab_size: int = 50304  # 50257 BPE tokens padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    gelu: str = (
        "tanh"  # the MLP's GELU: "tanh" (GPT-2's gelu_new, build-nanogpt, llm.c) or "none" (exact: nanoGPT)
    )

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        if self.gelu not in GELUS.values():
            raise UserError(f"GPTConfig.gelu must be one of {', '.join(GELUS.values())}, got {self.gelu!r}")

    @classmethod
    def named(cls, name: str, **overrides) -> GPTConfig:
        """A named shape (`gpt2_124m`, `gpt2`, `demo`, `tiny`) with optional field overrides."""
        if name not in NAMED_CONFIGS:
            raise UserError(f"unknown GPT config name {name!r}; known names: {', '.join(NAMED_CONFIGS)}")
        return cls(**{**NAMED_CONFIGS[name], **overrides})

    @classmethod
    def resolve(cls, spec: dict | str, source: object = "GPTConfig") -> GPTConfig:
        """`{"name": "gpt2_124m", **overrides}`, a bare name, or explicit fields (how configs and checkpoints
        spell a shape); a key that is not a field is a UserError naming `source`."""
        if isinstance(spec, str):
            return cls.named(spec)
        spec = dict(spec)
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(spec) - {"name", *fields})
        if unknown:
            raise UserError(f"{source}: {cls.__name__} has no fields {unknown} (its fields: {fields})")
        name = spec.pop("name", None)
        return cls.named(name, **spec) if name else cls(**spec)

    @classmethod
    def from_hf(cls, hf_config, source: object = "GPT2Config") -> GPTConfig:
        """The shape of a transformers `GPT2Config` (which must be GPT-2's architecture)."""
        activation = getattr(hf_config, "activation_function", "gelu_new")
        if activation not in GELUS:
            raise UserError(f"{source}: activation_function {activation!r} is not GPT-2's")
        return cls(
            gelu=GELUS[activation],
            block_size=hf_config.n_positions,
            vocab_size=hf_config.vocab_size,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
        )


NAMED_CONFIGS: dict[str, dict[str, int]] = {
    # build-nanogpt's training shape: GPT-2 small with the padded vocab
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    # OpenAI's GPT-2 small exactly (HF weights have 50257 rows)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    # CPU-sized shapes for the demo and the tests (the 50,304-row head dominates CPU time: narrow beats shallow)
    "demo": dict(n_layer=6, n_head=4, n_embd=64, block_size=128, vocab_size=50304),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304),
}

# --------------------------------------------------------------------------------------------------------------
# modules


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.n_embd = n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(
            n_embd, n_embd
        )  # residual projection: init std scaled down (GPT._init_weights)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) → (B, T, C). attn_mask (T, S) or (B, 1, T, S) bool, True where a query may attend; None
        is causal. With a cache, x holds only the new positions (T,): their keys/values are written there and
        attention reads all S cached positions under attn_mask."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.write(layer, k, v, positions)  # (B, nh, S, hs) each
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int, gelu: str = "tanh"):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate=gelu)  # tanh: GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) → (B, T, C)."""
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, gelu: str = "tanh"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, gelu)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, attn_mask, positions)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """GPT-2."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(
                    [Block(config.n_embd, config.n_head, config.gelu) for _ in range(config.n_layer)]
                ),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix embeds and un-embeds
        # Optional layers run after block int(key); empty for a plain LM, so its state-dict keys are GPT-2's.
        self.cross = nn.ModuleDict()
        self._init_weights()

    def _init_weights(self) -> None:
        """Weights N(0, init_std(name)), module by module in definition order; biases zero."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=self.init_std(name))
            if isinstance(module, nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    def init_std(self, name: str) -> float:
        """GPT-2's init std of module `name`'s weight: 0.02, the residual projections (c_proj) scaled by
        (2 * n_layer)^-0.5 because two of them (attention and MLP) add into the residual stream per block.
        A subclass may change one module's std here and keep every draw, in order (models/compact_vocab.py)."""
        return 0.02 * (2 * self.config.n_layer) ** -0.5 if name.endswith("c_proj") else 0.02

    def insert_cross_attention(self, every: int, make_layer: Callable[[int], nn.Module]) -> None:
        """Add `make_layer(i)` after each block i with (i + 1) % every == 0 (every=2 on 12 layers: 6 layers).

        Each layer is called as `layer(x, context, cache=cache, layer=i)` and returns the new x (B, T, C).
        """
        if not isinstance(every, int) or every < 1:
            raise UserError(f"cross-attention interval `every` must be a positive integer, got {every!r}")
        for i in range(self.config.n_layer):
            if (i + 1) % every == 0:
                self.cross[str(i)] = make_layer(i)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        context: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Next-token logits and, given targets, the mean cross-entropy.

        idx (B, T) token ids; targets (B, T) the token after each position, -100 where nothing is to be
        predicted (padding); context and cache as in `hidden_states`.
        return_logits=False (with targets) returns None for the logits and computes the loss with the output
        layer a chunk of rows at a time, never holding the (B, T, V) logits (`linear_cross_entropy`; same loss).
        Returns logits (B, T, V) or None, and loss (scalar) or None.
        """
        x = self.hidden_states(idx, context=context, cache=cache)  # (B, T, C)
        if targets is not None and not return_logits:
            return None, self.output_loss(x.view(-1, x.size(-1)), targets.view(-1))
        logits = self.logits(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer: hidden states (..., C) → logits (..., V) over token ids."""
        return self.lm_head(x)  # (..., V)

    def token_log_probs(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p (M,) of token ids targets (M,) after hidden states x (M, C), in fp32 (a policy gradient's)."""
        return -F.cross_entropy(self.lm_head(x).float(), targets, reduction="none")  # (M,)

    def output_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of hidden states x (M, C) against token ids (M,) (-100: skipped), the output layer
        fused with the loss a chunk of rows at a time, never holding the (M, V) logits (models/loss.py)."""
        return linear_cross_entropy(x, self.lm_head.weight, targets)

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states (B, T, C), before the output layer.

        context (B, N, C) image tokens for the cross-attention layers, if any (with a cache: one row per image,
        shared by `cache.group` rows of idx). cache: feed only new tokens; their positions continue from
        cache.length and the cache is extended. Without a cache, positions (T,) or (B, T) and attn_mask (T, T)
        or (B, 1, T, T), True where a query may attend, let several documents share a row (default: one
        document from position 0, causal).
        """
        T = idx.size(1)  # idx is (B, T)
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise UserError(
                f"sequence of length {start + T} exceeds the model's block_size {self.config.block_size}"
            )
        if cache is not None:
            positions = cache.positions(T, idx.device)  # (T,)
            attn_mask = cache.mask(positions)  # (T, S)
        elif positions is None:
            positions = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, attn_mask, positions)  # (B, T, C)
            if context is not None and str(i) in self.cross:
                x = self.cross[str(i)](x, context, cache=cache, layer=i)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)  # (B, T, C)

    # --- accounting ---------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (cross layers included). Position embeddings are excluded by default; token
        embeddings stay in because, tied, they are also the output layer's weights."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, num_params: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, PaLM appendix B: 6N + 12·L·H·Q·T (T = seq_len,
        default block_size; N = num_params, default `num_params()`, which a sharded model would undercount).
        Used for MFU = flops_per_token · tokens/s / peak FLOP/s."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len or cfg.block_size
        return 6 * (num_params or self.num_params()) + 12 * L * H * Q * T

    # --- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike) -> GPT:
        """OpenAI GPT-2 weights via transformers: a hub name ("gpt2") or a `save_pretrained` directory."""
        from transformers import GPT2LMHeadModel

        hf = from_hub(GPT2LMHeadModel.from_pretrained, name_or_dir, "GPT-2 weights")
        model = cls(GPTConfig.from_hf(hf.config, source=name_or_dir))
        sd = model.state_dict()
        # HF's GPT-2 uses Conv1D modules: the same math as Linear with the weight stored transposed.
        sd_hf = {
            k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
        }
        if set(sd_hf) != set(sd):
            raise UserError(
                f"{name_or_dir}: weights do not match GPT-2's layout; "
                f"missing {sorted(set(sd) - set(sd_hf))[:5]}, unexpected {sorted(set(sd_hf) - set(sd))[:5]}"
            )
        with torch.no_grad():
            for k, v in sd_hf.items():
                sd[k].copy_(v.t() if k.endswith(HF_TRANSPOSED) else v)
        return model


# --------------------------------------------------------------------------------------------------------------
# where GPT weights come from: transformers GPT-2, stage-1 checkpoints

HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint as plain data (weights_only; memory-mapped, so reading its config is cheap)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError for a bad file
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def lm_fields_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> dict:
    """The config fields of a stage-1 checkpoint's LM: hyper_parameters["gpt"] (["model"] before 0.2)."""
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    fields = (hparams or {}).get("gpt", (hparams or {}).get("model"))
    if not isinstance(fields, dict):
        raise UserError(
            f"{path}: not a stage-1 checkpoint (hyper_parameters.gpt must hold the LM's config fields)"
        )
    return fields


def read_lm_checkpoint(
    path: str | os.PathLike, ckpt: dict | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config fields, GPT state dict) of a stage-1 Lightning checkpoint (`ckpt`: the file already loaded):
    weights are the state_dict keys under `model.` (a torch.compile `_orig_mod.` prefix is dropped too).
    `checkpoints.read_lm` makes them a config of either kind (`compact_vocab.lm_config`)."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    fields = lm_fields_from_checkpoint(ckpt, path)
    state_dict = ckpt.get("state_dict") or {}
    weights = {
        key.removeprefix("model.").replace("_orig_mod.", ""): value
        for key, value in state_dict.items()
        if key.startswith("model.")
    }
    if not weights:
        raise UserError(f"{path}: state_dict has no `model.` keys; keys start with {sorted(state_dict)[:3]}")
    return fields, weights
