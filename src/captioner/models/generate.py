"""Batched decoding for GPT (and the captioner's LM): greedy or top-k / top-p / temperature sampling (one loop, two
ways to pick the next token), and beam search.

Every function takes the LM, a prompt (B, T0) and, for the captioner, `context` (B, N, C) image tokens. With
`use_cache=True` (default) a KVCache holds the self-attention keys/values and the image keys/values, so each
step feeds one token; `use_cache=False` feeds the whole sequence every step (the reference the cached path is
tested against, and the benchmark's baseline). Decoding stops at `eot` or after `max_new_tokens`. Only the first
`n_vocab` logits are considered, so the padding rows of a 50304-row vocab are never emitted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from captioner.models.gpt import GPT
from captioner.models.kv_cache import KVCache
from captioner.tokenizer import N_VOCAB

Pick = Callable[[torch.Tensor], torch.Tensor]  # next-token logits (B, V) float32 → chosen ids (B,)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice: (B, V) → (B,)."""
    return logits.argmax(dim=-1)


def sampler(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Pick:
    """A Pick that samples from softmax(logits / temperature), restricted to the top_k most likely tokens and
    then to the smallest set of them whose probability reaches top_p. Seed `generator` for reproducibility."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy decoding for argmax), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits / temperature  # (B, V)
        if top_k is None and top_p is None:
            return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        if top_k is not None:
            logits, ids = logits.topk(min(top_k, logits.size(-1)), dim=-1)  # (B, k), sorted descending
        else:
            logits, ids = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = F.softmax(logits, dim=-1)  # (B, k)
        if top_p is not None:
            # drop a token once the more likely ones already hold top_p of the mass (the first always stays)
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
        choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) index into the sorted list
        return ids.gather(-1, choice).squeeze(1)  # (B,)

    return pick


def _check_length(lm: GPT, prompt: torch.Tensor, max_new_tokens: int) -> None:
    # the last new token is returned, never fed, hence the - 1
    fed = prompt.size(1) + max_new_tokens - 1
    if fed > lm.config.block_size:
        raise ValueError(
            f"prompt of {prompt.size(1)} tokens + max_new_tokens={max_new_tokens} needs {fed} positions; "
            f"the model's block_size is {lm.config.block_size}"
        )


def _next_logits(
    lm: GPT,
    seq: torch.Tensor,
    n_new: int,
    context: torch.Tensor | None,
    cache: KVCache | None,
    n_vocab: int,
) -> torch.Tensor:
    """Logits (B, n_vocab) float32 for the token after seq (B, T); with a cache only the last n_new are fed."""
    idx = seq[:, -n_new:] if cache is not None else seq
    logits, _ = lm(idx, context=context, cache=cache)  # (B, T', V)
    return logits[:, -1, :n_vocab].float()


def _until_eot(tokens: torch.Tensor, eot: int | None) -> list[list[int]]:
    """(B, n) ids → per-row lists cut before the first eot."""
    rows = tokens.tolist()
    return [row[: row.index(eot)] if eot in row else row for row in rows]


@torch.no_grad()
def decode(
    lm: GPT,
    prompt: torch.Tensor,
    pick: Pick,
    *,
    max_new_tokens: int,
    eot: int | None = None,
    context: torch.Tensor | None = None,
    use_cache: bool = True,
    n_vocab: int = N_VOCAB,
) -> torch.Tensor:
    """One token per step for every row, chosen by `pick` (argmax or a sampler).

    prompt (B, T0) ids; context (B, N, C) or None. Returns the new ids (B, n), n ≤ max_new_tokens: a row that
    emitted eot is padded with eot; decoding ends when every row has, or after max_new_tokens.
    """
    _check_length(lm, prompt, max_new_tokens)
    cache = KVCache() if use_cache else None
    seq = prompt  # (B, T)
    finished = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)  # (B,)
    n_new = prompt.size(1)  # the first step feeds the whole prompt (prefill)
    for _ in range(max_new_tokens):
        logits = _next_logits(lm, seq, n_new, context, cache, n_vocab)  # (B, V)
        token = pick(logits)  # (B,)
        if eot is not None:
            token = token.masked_fill(finished, eot)
            finished = finished | (token == eot)
        seq = torch.cat([seq, token[:, None]], dim=1)  # (B, T + 1)
        n_new = 1
        if eot is not None and bool(finished.all()):
            break
    return seq[:, prompt.size(1) :]


def generate(
    lm: GPT,
    prompt: torch.Tensor,
    pick: Pick = argmax,
    *,
    max_new_tokens: int,
    eot: int,
    context: torch.Tensor | None = None,
    use_cache: bool = True,
    n_vocab: int = N_VOCAB,
) -> list[list[int]]:
    """Greedy decoding (pick=argmax, the default) or sampling (pick=sampler(...)). Returns per-row new ids,
    eot excluded."""
    tokens = decode(
        lm,
        prompt,
        pick,
        max_new_tokens=max_new_tokens,
        eot=eot,
        context=context,
        use_cache=use_cache,
        n_vocab=n_vocab,
    )
    return _until_eot(tokens, eot)


class _Hypotheses:
    """The best `num_beams` finished sequences of one example, ranked by sum log-prob / length**length_penalty."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.best: list[tuple[float, list[int]]] = []  # (normalised score, ids), best first

    def add(self, tokens: list[int], logprob: float, length: int) -> None:
        """`length` counts the generated tokens the score was summed over (the final eot included)."""
        self.best.append((logprob / length**self.length_penalty, tokens))
        self.best.sort(key=lambda h: h[0], reverse=True)
        del self.best[self.num_beams :]

    def is_done(self, best_running_logprob: float, length: int) -> bool:
        """HF's default heuristic (early_stopping=False): stop once the best running beam, scored at its
        current length, cannot beat the worst of num_beams finished hypotheses."""
        if len(self.best) < self.num_beams:
            return False
        return self.best[-1][0] >= best_running_logprob / length**self.length_penalty


@torch.no_grad()
def beam_search(
    lm: GPT,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    eot: int,
    num_beams: int = 3,
    length_penalty: float = 1.0,
    context: torch.Tensor | None = None,
    use_cache: bool = True,
    n_vocab: int = N_VOCAB,
) -> list[list[int]]:
    """Beam search with HF's scoring: a finished hypothesis scores sum log-prob / length**length_penalty.

    prompt (B, T0); context (B, N, C) or None, repeated per beam (the cache computes its keys/values once, on
    the first step). Returns per-example best new ids, eot excluded.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams!r}")
    _check_length(lm, prompt, max_new_tokens)
    B, T0 = prompt.shape
    K = num_beams
    device = prompt.device
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    seq = prompt.repeat_interleave(K, dim=0)  # (B*K, T0): row b*K + j is beam j of example b
    if context is not None:
        context = context.repeat_interleave(K, dim=0)  # (B*K, N, C)
    cache = KVCache() if use_cache else None
    # All beams start as the same prompt: only beam 0 may expand on the first step, or we'd get K copies.
    scores = torch.full((B, K), float("-inf"), device=device)  # (B, K) sum log-prob per running beam
    scores[:, 0] = 0.0
    hyps = [_Hypotheses(K, length_penalty) for _ in range(B)]
    done = [False] * B
    n_new = T0
    for step in range(max_new_tokens):
        length = step + 1  # generated tokens after this step
        logprobs = _next_logits(lm, seq, n_new, context, cache, n_vocab).log_softmax(dim=-1)  # (B*K, V)
        V = logprobs.size(-1)
        candidates = (scores[:, :, None] + logprobs.view(B, K, V)).view(B, K * V)  # (B, K*V)
        # 2K candidates: at most K of them are eot (one per parent), so K running beams always survive
        top_scores, top_flat = candidates.topk(2 * K, dim=1)  # (B, 2K) each
        top_scores, top_flat = top_scores.tolist(), top_flat.tolist()
        parents, tokens, new_scores = [], [], []
        for b in range(B):
            beams = []  # (row of the parent beam, next token, sum log-prob)
            if not done[b]:
                for rank, (score, flat) in enumerate(zip(top_scores[b], top_flat[b])):
                    parent, token = divmod(flat, V)
                    if token == eot:
                        if rank < K:  # an eot outside the top K is worse than K continuing beams (HF)
                            hyps[b].add(seq[b * K + parent, T0:].tolist(), score, length)
                    else:
                        beams.append((b * K + parent, token, score))
                    if len(beams) == K:
                        break
                done[b] = hyps[b].is_done(beams[0][2], length)
            if done[b]:  # keep the tensor shapes: feed eot to its beams, whose outcome no longer matters
                beams = [(b * K + j, eot, 0.0) for j in range(K)]
            for parent, token, score in beams:
                parents.append(parent)
                tokens.append(token)
                new_scores.append(score)
        index = torch.tensor(parents, dtype=torch.long, device=device)  # (B*K,)
        next_tokens = torch.tensor(tokens, dtype=torch.long, device=device)  # (B*K,)
        seq = torch.cat([seq.index_select(0, index), next_tokens[:, None]], dim=1)  # (B*K, T + 1)
        scores = torch.tensor(new_scores, device=device).view(B, K)  # (B, K)
        if cache is not None:
            cache.reorder(index)
        n_new = 1
        if all(done):
            break
    # Out of steps: the running beams compete with the finished hypotheses.
    length = seq.size(1) - T0
    for b in range(B):
        if not done[b]:
            for j in range(K):
                hyps[b].add(seq[b * K + j, T0:].tolist(), scores[b, j].item(), length)
    return [h.best[0][1] for h in hyps]
