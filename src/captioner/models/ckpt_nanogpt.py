"""build-nanogpt's and nanoGPT's checkpoints, read only. Both `torch.save` a dict around their GPT's state dict,
whose keys are ours (our GPT follows theirs), prefixed `_orig_mod.` when the saved model was compiled.

- build-nanogpt `log/model_NNNNN.pt` (its train_gpt2.py): {"model", "config": its GPTConfig dataclass, "step",
  "val_loss"}. The script runs as __main__, so the config is pickled as `__main__.GPTConfig`; a weights-only
  load turns it into a `PickledGPTConfig` (`SAFE_GLOBALS` allow-lists that one name, nothing else).
- nanoGPT `out/ckpt.pt` (its train.py): {"model", "optimizer", "model_args": a plain dict, "iter_num",
  "best_val_loss", "config"}. With model_args["bias"] False its Linears and LayerNorms have no biases: our GPT
  with zero biases. Its causal-mask buffer (`attn.bias`, saved when it ran without flash attention) is no weight.
  Its MLP uses the exact (erf) GELU where ours, GPT-2's and build-nanogpt's use the tanh form, so its logits
  differ from ours by that approximation (scripts/check_neighbours.py measures how much).
"""

from __future__ import annotations

import os

import torch

from captioner.errors import UserError
from captioner.models.gpt import GPTConfig

SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
# modules of a GPT block (and ln_f) that have a bias in GPT-2 and in our GPT
BIASED = ("ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc")


class PickledGPTConfig:
    """What build-nanogpt's pickled `GPTConfig` becomes when loaded: its fields as attributes, nothing run."""


SAFE_GLOBALS = [(PickledGPTConfig, "__main__.GPTConfig")]


def is_build_nanogpt(ckpt: dict) -> bool:
    return isinstance(ckpt.get("config"), PickledGPTConfig) and "model" in ckpt


def is_nanogpt(ckpt: dict) -> bool:
    return isinstance(ckpt.get("model_args"), dict) and "model" in ckpt


def read_build_nanogpt(ckpt: dict, path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, GPT state dict) of a loaded build-nanogpt checkpoint."""
    fields = vars(ckpt["config"])
    config = gpt_config(fields, SHAPE_FIELDS, path, "build-nanogpt config")
    return config, plain_weights(ckpt["model"], path)


def read_nanogpt(ckpt: dict, path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, GPT state dict) of a loaded nanoGPT checkpoint; a bias=False model gets zero biases."""
    args = dict(ckpt["model_args"])
    args.pop("dropout", None)  # training only: off at evaluation, and we train without it
    bias = args.pop("bias", True)
    if not isinstance(bias, bool):
        raise UserError(f"{path}: nanoGPT model_args.bias must be True or False, got {bias!r}")
    config = gpt_config(args, SHAPE_FIELDS, path, "nanoGPT model_args", gelu="none")  # its nn.GELU(): exact
    weights = plain_weights(ckpt["model"], path)
    if not bias:
        for key, weight in list(weights.items()):
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module.rsplit(".", 1)[-1] in BIASED:
                weights.setdefault(f"{module}.bias", weight.new_zeros(weight.shape[0]))  # (out,)
    return config, weights


def gpt_config(
    fields: dict, names: tuple[str, ...], path: str | os.PathLike, what: str, gelu: str = "tanh"
) -> GPTConfig:
    """Our GPTConfig from a neighbour's config fields, which must be exactly `names` (another field could change
    the model's maths)."""
    missing, unknown = set(names) - set(fields), set(fields) - set(names)
    if missing or unknown:
        raise UserError(
            f"{path}: {what} must have the fields {', '.join(names)}; missing {sorted(missing)}, "
            f"unknown {sorted(map(str, unknown))}"
        )
    try:
        return GPTConfig(**{name: fields[name] for name in names}, gelu=gelu)
    except UserError as err:
        raise UserError(f"{path}: {what}: {err}") from None


def plain_weights(state_dict, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Their state dict under our keys: torch.compile's `_orig_mod.` dropped, the causal-mask buffer left out."""
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: its `model` entry is a {type(state_dict).__name__}, not a state dict")
    return {
        str(key).replace("_orig_mod.", ""): value
        for key, value in state_dict.items()
        if not str(key).endswith((".attn.bias", ".attn.masked_bias"))
    }
