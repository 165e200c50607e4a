"""HellaSwag scorer: build-nanogpt's rule, batched across examples and split across DDP ranks.

For each example the model reads `ctx + " " + ending` for the 4 endings; an ending's loss is the cross-entropy of
its own tokens only. `acc` picks the ending with the lowest summed loss, `acc_norm` the lowest mean loss (the
number build-nanogpt reports; OpenAI's GPT-2 124M gets 0.2955 on the val split).

Instead of one forward per example (4 rows), several examples' rows are right-padded into one batch. With causal
attention, padding after a row's last token cannot change the logits at its earlier positions, and a mask keeps
padding out of the losses, so the batched scores equal the one-at-a-time ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from captioner.data.hellaswag import load_examples, render_example
from captioner.tokenizer import gpt2_encoding

COUNT_KEYS = ("n", "correct", "correct_norm")


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    """`model(idx)` as (B, T, V) logits, whether it returns them bare, first in a tuple, or as `.logits` (HF)."""
    out = model(idx)
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "logits", out)


def _truncate(rows: list[list[int]], starts: list[int], block_size: int | None):
    """Drop context tokens from the left so each row fits the model; keep every start >= 1.

    Position 0 has no preceding token to predict it from, so at least one token must come before the ending
    (build-nanogpt's shifted mask drops position 0 the same way).
    """
    out_rows, out_starts = [], []
    for row, start in zip(rows, starts):
        drop = max(0, len(row) - block_size) if block_size else 0
        out_rows.append(row[drop:])
        out_starts.append(max(1, start - drop))
    return out_rows, out_starts


def ending_losses(
    model, rendered: Sequence[tuple[list[list[int]], list[int]]], device
) -> tuple[torch.Tensor, ...]:
    """Summed and mean cross-entropy of every ending of every example, in one forward pass.

    `rendered` holds E examples as `(rows, starts)` from `render_example` (4 rows each). Returns two (E, 4)
    float32 tensors on `device`: the loss summed over each ending's tokens, and its mean per token.
    """
    rows = [row for ex_rows, _ in rendered for row in ex_rows]
    starts = [start for _, ex_starts in rendered for start in ex_starts]
    R, T = len(rows), max(len(row) for row in rows)
    idx = torch.zeros((R, T), dtype=torch.long)  # (R, T) right-padded with token 0
    is_ending = torch.zeros((R, T), dtype=torch.bool)  # (R, T) True at ending tokens
    for i, (row, start) in enumerate(zip(rows, starts)):
        idx[i, : len(row)] = torch.tensor(row)
        is_ending[i, start : len(row)] = True
    idx, is_ending = idx.to(device), is_ending.to(device)

    logits = _logits(model, idx)  # (R, T, V)
    # Logits at position t predict token t + 1: score only the positions whose next token is an ending token.
    scored = is_ending[:, 1:]  # (R, T-1)
    picked = logits[:, :-1][scored].float()  # (N, V) N = scored tokens over all rows
    token_losses = F.cross_entropy(picked, idx[:, 1:][scored], reduction="none")  # (N,)
    row_of = torch.arange(R, device=device).unsqueeze(1).expand(R, T - 1)[scored]  # (N,)
    sum_loss = torch.zeros(R, device=device).index_add_(0, row_of, token_losses)  # (R,)
    mean_loss = sum_loss / scored.sum(dim=1).clamp(min=1)  # (R,)
    return sum_loss.view(-1, 4), mean_loss.view(-1, 4)


def reduce_counts(counts: dict, device) -> dict:
    """Sum the integer counts over all ranks of the initialised process group."""
    t = torch.tensor([counts[k] for k in COUNT_KEYS], dtype=torch.long, device=device)  # (3,)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(COUNT_KEYS, t.tolist()))


def score_hellaswag(
    model,
    examples: Sequence[dict],
    *,
    batch_size: int = 16,
    device=None,
    rank: int = 0,
    world_size: int = 1,
    enc=None,
) -> dict:
    """Count correct HellaSwag predictions: `{"n", "correct", "correct_norm"}`, summed over ranks.

    `model(idx)` with idx (B, T) must give logits (B, T, V) (bare, first of a tuple, or `.logits`). `examples`
    are dicts as from `load_examples`; rank r scores `examples[r::world_size]`, and when a process group is
    initialised and world_size > 1 the counts are all-reduced, so every rank returns the totals (every rank
    must call this). `batch_size` counts examples (4 rows each). Contexts are cut from the left to fit
    `model.config.block_size` when the model has one. `device` is where inputs go (default: the model's).
    """
    enc = enc or gpt2_encoding()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    mine = list(examples[rank::world_size])
    rendered = [_truncate(*render_example(ex, enc), block_size) for ex in mine]
    # Batching examples of similar length keeps padding (wasted compute) small; counts do not depend on order.
    order = sorted(range(len(mine)), key=lambda i: max(len(row) for row in rendered[i][0]))

    counts = dict.fromkeys(COUNT_KEYS, 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
                sum_loss, mean_loss = ending_losses(
                    model, [rendered[i] for i in batch], device
                )  # (E, 4) each
                labels = torch.tensor([mine[i]["label"] for i in batch], device=device)  # (E,)
                counts["correct"] += int((sum_loss.argmin(dim=1) == labels).sum())
                counts["correct_norm"] += int((mean_loss.argmin(dim=1) == labels).sum())
    finally:
        model.train(was_training)
    counts["n"] = len(mine)

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        counts = reduce_counts(counts, device)
    return counts


def evaluate_hellaswag(
    model, path_or_examples, *, limit: int | None = None, batch_size: int = 16, device=None
) -> dict:
    """Accuracies on a HellaSwag jsonl file (or a list of examples) in this process: `{"n", "acc", "acc_norm"}`."""
    if isinstance(path_or_examples, (str, os.PathLike)):
        examples = load_examples(path_or_examples, limit=limit)
    else:
        examples = list(path_or_examples)[:limit]
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    counts = score_hellaswag(model, examples, batch_size=batch_size, device=device)
    n = counts["n"]
    return {"n": n, "acc": counts["correct"] / n, "acc_norm": counts["correct_norm"] / n}
