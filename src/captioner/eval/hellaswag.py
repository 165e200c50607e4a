"""HellaSwag scorer: build-nanogpt's rule, packed across examples and split across DDP ranks.

For each example the model reads `ctx + " " + ending` for the 4 endings; an ending's loss is the cross-entropy of
its own tokens only. `acc` picks the ending with the lowest summed loss, `acc_norm` the lowest mean loss (the
number build-nanogpt reports; OpenAI's GPT-2 124M gets 0.2955 on the val split).

Packed (our GPT, the default): an example's context is fed once, followed by its 4 endings, each ending at the
positions it would have after the context and attending to the context and itself only; several examples share a
row, each seeing only itself (a block-diagonal causal mask). Every ending token then sees exactly what it sees in
its own row, so the losses equal build-nanogpt's, while the context is computed once instead of 4 times, no
padding is fed, and the output layer runs only where an ending token is predicted. Losses are reduced per ending on
the device; counts are read once at the end.

Padded (any model returning logits, e.g. transformers'): several examples' rows are right-padded into one batch;
with causal attention, padding after a row cannot change its earlier logits, and a mask keeps it out of the losses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from captioner.data.hellaswag import load_examples, render_example
from captioner.errors import UserError
from captioner.models.loss import CHUNK_ROWS  # scored tokens per output-layer call
from captioner.tokenizer import gpt2_encoding

COUNT_KEYS = ("n", "correct", "correct_norm")
PACK_LENGTH = 256  # packed row length unless an example is longer (at most the block size; see `_packed`)


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


@dataclass
class _Unit:
    """A prefix (context) followed by endings that each attend to it and to themselves; `owners[i]` is the
    (example * 4 + ending) slot the loss of `endings[i]` goes to."""

    prefix: list[int]
    endings: list[list[int]]
    owners: list[int]

    def __len__(self) -> int:
        return len(self.prefix) + sum(map(len, self.endings))


def _units(example: int, rows: list[list[int]], starts: list[int], capacity: int) -> list[_Unit]:
    """One unit for an example whose 4 (truncated) rows share their context and fit `capacity` together;
    otherwise one unit per row, which is that row exactly."""
    prefix = rows[0][: starts[0]]
    owners = [4 * example + i for i in range(len(rows))]
    endings = [row[start:] for row, start in zip(rows, starts)]
    unit = _Unit(prefix, endings, owners)
    if all(row[:start] == prefix for row, start in zip(rows, starts)) and len(unit) <= capacity:
        return [unit]
    return [
        _Unit(row[:start], [end], [owner]) for row, start, end, owner in zip(rows, starts, endings, owners)
    ]


def _pack(units: list[_Unit], capacity: int) -> list[list[_Unit]]:
    """Rows of units holding at most `capacity` tokens: the longest unit left opens a row, the next longest fill
    it while they fit, then the shortest top it up."""
    left = sorted(units, key=len)  # shortest first: pop() takes the longest, pop(0) the shortest
    rows = []
    while left:
        row = [left.pop()]
        used = len(row[0])
        for end in (-1, 0):
            while left and used + len(left[end]) <= capacity:
                row.append(left.pop(end))
                used += len(row[-1])
        rows.append(row)
    return rows


def packed_ending_losses(
    model, packed_rows: list[list[_Unit]], n_slots: int, device
) -> tuple[torch.Tensor, ...]:
    """Summed and mean cross-entropy (n_slots,) float32 of every ending in these packed rows, in one forward.

    Builds, per row: ids, positions, the unit and segment of each token (segment 0 the prefix, i + 1 ending i),
    and for every scored token the flat index of the position that predicts it and the slot its loss goes to.
    """
    T = max(sum(map(len, row)) for row in packed_rows)
    idx, pos, unit_of, segment = [], [], [], []
    source, target, owner = [], [], []
    for r, row in enumerate(packed_rows):
        ids, positions, units, segments = [], [], [], []
        for u, unit in enumerate(row):
            base, c = len(ids), len(unit.prefix)
            ids += unit.prefix
            positions += range(c)
            segments += [0] * c
            for e, (ending, slot) in enumerate(zip(unit.endings, unit.owners)):
                start = len(ids)
                ids += ending
                positions += range(c, c + len(ending))
                segments += [e + 1] * len(ending)
                # ending token t is predicted at the prefix's last position (t = 0) or at ending token t - 1
                source += [r * T + base + c - 1, *range(r * T + start, r * T + start + len(ending) - 1)]
                target += ending
                owner += [slot] * len(ending)
            units += [u] * (len(ids) - base)
        pad = T - len(ids)
        idx.append(ids + [0] * pad)
        pos.append(positions + [0] * pad)
        unit_of.append(units + [-1] * pad)  # padding is its own unit: it sees only padding, never scored
        segment.append(segments + [0] * pad)
    idx, pos = torch.tensor(idx, device=device), torch.tensor(pos, device=device)  # (R, T) each
    unit_of, segment = torch.tensor(unit_of, device=device), torch.tensor(segment, device=device)  # (R, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    same_unit = unit_of[:, :, None] == unit_of[:, None, :]  # (R, T, T) query, key
    visible = (segment[:, None, :] == 0) | (
        segment[:, :, None] == segment[:, None, :]
    )  # key is prefix or own ending
    mask = (same_unit & visible & causal)[:, None]  # (R, 1, T, T)

    hidden = model.hidden_states(idx, positions=pos, attn_mask=mask)  # (R, T, C)
    hidden = hidden.view(-1, hidden.size(-1))  # (R*T, C)
    source = torch.tensor(source, device=device)  # (M,) M scored tokens
    target = torch.tensor(target, device=device)  # (M,)
    owner = torch.tensor(owner, device=device)  # (M,)
    losses = torch.cat([  # the (M, V) logits in chunks, so a big batch never holds them all at once
        F.cross_entropy(model.logits(hidden[src]).float(), tgt, reduction="none")
        for src, tgt in zip(source.split(CHUNK_ROWS), target.split(CHUNK_ROWS))
    ])  # fmt: skip
    sum_loss = torch.zeros(n_slots, device=device).index_add_(0, owner, losses)  # (n_slots,)
    mean_loss = sum_loss / torch.bincount(owner, minlength=n_slots).clamp(min=1)  # (n_slots,)
    return sum_loss, mean_loss


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
    pack: bool | None = None,
) -> dict:
    """Count correct HellaSwag predictions: `{"n", "correct", "correct_norm"}`, summed over ranks.

    `model(idx)` with idx (B, T) must give logits (B, T, V) (bare, first of a tuple, or `.logits`). `examples`
    are dicts as from `load_examples`; rank r scores `examples[r::world_size]`, and when a process group is
    initialised and world_size > 1 the counts are all-reduced, so every rank returns the totals (every rank
    must call this). `batch_size` counts examples per forward (4 rows each when padded; packed rows are filled
    up to it). Contexts are cut from the left to fit `model.config.block_size` when the model has one. `device` is
    where inputs go (default: the model's). pack: pack examples (default when the model has `hidden_states` and
    `logits`, as our GPT) or right-pad them (any model returning logits).
    """
    enc = enc or gpt2_encoding()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    mine = list(examples[rank::world_size])
    rendered = [_truncate(*render_example(ex, enc), block_size) for ex in mine]
    labels = torch.tensor([ex["label"] for ex in mine], device=device)  # (E,)
    if pack is None:
        pack = hasattr(model, "hidden_states") and hasattr(model, "logits") and block_size is not None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sum_loss = mean_loss = torch.zeros(0, 4, device=device)  # a rank may have no examples
            if rendered:
                score = _packed if pack else _padded
                sum_loss, mean_loss = score(model, rendered, batch_size, block_size, device)
    finally:
        model.train(was_training)
    counts = {
        "n": len(mine),
        "correct": int((sum_loss.argmin(dim=1) == labels).sum()),
        "correct_norm": int((mean_loss.argmin(dim=1) == labels).sum()),
    }
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        counts = reduce_counts(counts, device)
    return counts


def _padded(model, rendered, batch_size, block_size, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, 4) summed and mean losses, examples of similar length right-padded together."""
    # Batching examples of similar length keeps padding (wasted compute) small; losses do not depend on order.
    order = sorted(range(len(rendered)), key=lambda i: max(len(row) for row in rendered[i][0]))
    sum_loss = torch.zeros(len(rendered), 4, device=device)
    mean_loss = torch.zeros(len(rendered), 4, device=device)
    for b in range(0, len(order), batch_size):
        batch = torch.tensor(order[b : b + batch_size], device=device)
        sum_loss[batch], mean_loss[batch] = ending_losses(
            model, [rendered[i] for i in batch.tolist()], device
        )
    return sum_loss, mean_loss


def _packed(model, rendered, batch_size, block_size, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, 4) summed and mean losses, examples packed into rows (see the module docstring).

    Rows hold up to max(PACK_LENGTH, the longest unit) tokens, at most the block size: long enough that few
    tokens are left over, short enough that the dense attention mask does not cost more than the padding saved.
    """
    units = [
        unit for e, (rows, starts) in enumerate(rendered) for unit in _units(e, rows, starts, block_size)
    ]
    capacity = min(block_size, max(PACK_LENGTH, max(map(len, units))))
    rows = _pack(units, capacity)
    sums, means = torch.zeros(4 * len(rendered), device=device), torch.zeros(4 * len(rendered), device=device)
    tokens_per_forward = batch_size * sum(map(len, units)) // len(rendered)  # as many as batch_size examples
    rows_per_forward = max(1, tokens_per_forward // capacity)
    for b in range(0, len(rows), rows_per_forward):
        s, m = packed_ending_losses(model, rows[b : b + rows_per_forward], 4 * len(rendered), device)
        sums += s
        means += m
    return sums.view(-1, 4), means.view(-1, 4)


def evaluate_hellaswag(
    model, path_or_examples, *, limit: int | None = None, batch_size: int = 16, device=None
) -> dict:
    """Accuracies on a HellaSwag jsonl file (or a list of examples) in this process: `{"n", "acc", "acc_norm"}`."""
    if isinstance(path_or_examples, (str, os.PathLike)):
        examples = load_examples(path_or_examples, limit=limit)
    else:
        examples = list(path_or_examples)[:limit]
    if not examples:
        raise UserError("no HellaSwag examples to evaluate")
    counts = score_hellaswag(model, examples, batch_size=batch_size, device=device)
    n = counts["n"]
    return {"n": n, "acc": counts["correct"] / n, "acc_norm": counts["correct_norm"] / n}
