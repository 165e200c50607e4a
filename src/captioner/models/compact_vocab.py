"""GPT-2 over a compact vocabulary: the shapes demo's LM, whose world uses 65 of GPT-2's 50,257 token ids.

The embedding and the output layer keep one row per listed id, so a model of a synthetic corpus spends nothing on
the tokens it never sees (5x the demo's steps per second on a CPU), while its callers keep speaking GPT-2 ids:
inputs are mapped to rows (an id not listed reads as <|endoftext|>), logits come back over all of GPT-2's ids
(probability 0 for the ids not listed), and the loss maps its targets to rows. The weights are a GPT-2's over
`vocab_size` rows, under GPT-2's parameter names: `GPT(config)` has the same state-dict keys and shapes.

`lm_config` reads a stage-1 LM's config as experiment configs and checkpoints spell it (`vocab_ids` selects this
kind) and `build_lm` builds either kind.

Shapes: B batch, T sequence length, C n_embd, V vocab_size (the listed ids), M rows of a loss.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.errors import UserError
from captioner.models.gpt import GPT, GPTConfig
from captioner.tokenizer import EOT, N_VOCAB


@dataclass(kw_only=True)
class CompactVocabConfig(GPTConfig):
    """A GPTConfig whose `vocab_size` rows stand for the GPT-2 token ids `vocab_ids`, row r for vocab_ids[r]."""

    vocab_ids: tuple[int, ...]  # sorted GPT-2 ids, <|endoftext|> among them (or a JSON file listing them)
    wte_std: float = (
        0.02  # init std of the tied token embedding (GPT-2's 0.02; the demo's 0.5 keeps words apart)
    )

    def __post_init__(self):
        if isinstance(self.vocab_ids, str | os.PathLike):
            self.vocab_ids = read_vocab_ids(self.vocab_ids)
        self.vocab_ids = checked_vocab_ids(self.vocab_ids)
        # One row per listed id, whatever a named shape (or a checkpoint before 2026-12-06) gave: GPT-2's 50,304.
        self.vocab_size = len(self.vocab_ids)
        super().__post_init__()
        std = self.wte_std
        if isinstance(std, bool) or not isinstance(std, int | float) or not std > 0:
            raise UserError(f"CompactVocabConfig.wte_std must be a positive number, got {std!r}")
        self.wte_std = float(std)


def checked_vocab_ids(ids) -> tuple[int, ...]:
    """`ids` as a sorted tuple, or a UserError naming what is wrong with them."""
    if isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
        raise UserError(
            f"CompactVocabConfig.vocab_ids must be a list of token ids or a JSON file, got {ids!r}"
        )
    ids = list(ids)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < N_VOCAB]
    if bad or not ids:
        raise UserError(
            "CompactVocabConfig.vocab_ids must be distinct GPT-2 token ids in "
            f"[0, {N_VOCAB}), got {bad[:5] or 'an empty list'}"
        )
    if len(set(ids)) != len(ids):
        raise UserError("CompactVocabConfig.vocab_ids lists a token id twice")
    if EOT not in ids:
        # Documents start with EOT, and ids outside the list read as it.
        raise UserError(f"CompactVocabConfig.vocab_ids must include <|endoftext|> ({EOT})")
    return tuple(sorted(ids))


def read_vocab_ids(path: str | os.PathLike) -> list[int]:
    """The token ids listed in a JSON file (as `captioner-prepare shapes` writes `vocab_ids.json`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"vocab_ids file not found: {path} (captioner-prepare shapes writes one)")
    try:
        ids = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(ids, list):
        raise UserError(f"{path}: expected a JSON list of token ids, got {type(ids).__name__}")
    return ids


class CompactVocabGPT(GPT):
    """GPT-2 over `config.vocab_ids`, reading and writing GPT-2 token ids."""

    def __init__(self, config: CompactVocabConfig):
        super().__init__(config)
        ids = torch.tensor(config.vocab_ids)  # (V,) sorted
        rows = torch.full((N_VOCAB,), config.vocab_ids.index(EOT), dtype=torch.long)
        rows[ids] = torch.arange(len(ids))
        # Derived from the config, not weights: kept out of the state dict, whose keys stay GPT-2's.
        self.register_buffer("row_of_id", rows, persistent=False)  # (N_VOCAB,)
        self.register_buffer("id_of_row", ids, persistent=False)  # (V,)

    def init_std(self, name: str) -> float:
        # lm_head is the last module GPT initialises, so its std is the tied token embedding's
        return self.config.wte_std if name == "lm_head" else super().init_std(name)

    def hidden_states(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """GPT.hidden_states of GPT-2 token ids idx (B, T)."""
        return super().hidden_states(self.row_of_id[idx], **kwargs)  # (B, T, C)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) → logits (..., N_VOCAB) over GPT-2's token ids."""
        logits = super().logits(x)  # (..., V)
        # The lowest finite value rather than -inf: softmax still gives the other ids exactly 0, and a loss
        # masked by multiplication (padding × 0) stays 0 instead of NaN.
        lowest = torch.finfo(logits.dtype).min
        full = logits.new_full((*logits.shape[:-1], N_VOCAB), lowest)
        return full.index_copy(-1, self.id_of_row, logits)  # (..., N_VOCAB)

    def output_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """GPT.output_loss against GPT-2 token ids targets (M,)."""
        return super().output_loss(x, self._target_rows(targets))

    def token_log_probs(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """GPT.token_log_probs of GPT-2 token ids (M,), over the listed rows only: the same values, since every
        other id has probability 0."""
        return super().token_log_probs(x, self._target_rows(targets))

    def _target_rows(self, targets: torch.Tensor) -> torch.Tensor:
        # An id not listed becomes row V, out of range: the loss raises rather than train on the wrong
        # token (such an id has zero probability; the data does not fit the model).
        rows = self.row_of_id[targets.clamp(min=0)]  # (M,)
        rows = torch.where(self.id_of_row[rows] == targets, rows, self.config.vocab_size)
        return torch.where(targets == -100, targets, rows)


# --------------------------------------------------------------------------------------------------------------
# which kind of LM a config names


def lm_config(spec: dict | str, source: object = "model.gpt") -> GPTConfig:
    """The config of a stage-1 LM: a GPTConfig name, `{"name": ..., **overrides}` or explicit fields
    (`GPTConfig.resolve`); `vocab_ids` makes it a CompactVocabConfig. Checkpoints of a GPT-2 written from
    2026-12-02 to 2026-12-06 record `vocab_ids: null, wte_std: 0.02`: they read as GPT-2."""
    if isinstance(spec, str):
        return GPTConfig.named(spec)
    spec = dict(spec)
    if spec.get("vocab_ids") is not None:
        return CompactVocabConfig.resolve(spec, source)
    spec.pop("vocab_ids", None)
    if spec.pop("wte_std", 0.02) != 0.02:
        raise UserError(f"{source}: wte_std belongs to a compact vocabulary: it needs vocab_ids")
    return GPTConfig.resolve(spec, source)


def build_lm(config: GPTConfig, weights: dict[str, torch.Tensor] | None = None) -> GPT:
    """The LM of `config` (CompactVocabGPT for a CompactVocabConfig), randomly initialised or holding `weights`
    (a GPT state dict, e.g. `gpt.read_lm_checkpoint`'s)."""
    model = CompactVocabGPT(config) if isinstance(config, CompactVocabConfig) else GPT(config)
    if weights is not None:
        model.load_state_dict(weights)
    return model
