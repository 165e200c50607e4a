"""Batched decoding for GPT (and the captioner's LM): greedy or top-k / top-p / temperature sampling (one loop, two
ways to pick the next token), and beam search.

Every function takes the LM, a prompt (B, T0) and, for the captioner, `context` (B, N, C) image tokens. With
`use_cache=True` (default) a static KVCache holds the self-attention keys/values and each image's keys/values
(shared by its beams), so each step feeds one token; `cuda_graph=True` also replays that step as a CUDA graph
(CUDA only). `use_cache=False` feeds the whole sequence every step: the reference the cached path is tested
against, and the benchmark's baseline. Decoding stops at `eot` or after `max_new_tokens`. Only the first
`n_vocab` logits are considered, so the padding rows of a 50304-row vocab are never emitted.

All bookkeeping (finished rows, beam scores, parents, finished hypotheses) stays on the device: the loop never
waits for the GPU except to read, without blocking, whether every row has finished (`_Finished`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from captioner.errors import UserError
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
        raise UserError(f"temperature must be > 0 (use greedy decoding for argmax), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] or None, got {top_p!r}")

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits / temperature  # (B, V)
        if top_k is None and top_p is None:
            return draw(F.softmax(logits.float(), dim=-1), generator)
        if top_k is not None:
            logits, ids = logits.topk(min(top_k, logits.size(-1)), dim=-1)  # (B, k), sorted descending
        else:
            logits, ids = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = F.softmax(logits, dim=-1)  # (B, k)
        if top_p is not None:
            # drop a token once the more likely ones already hold top_p of the mass (the first always stays)
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
        choice = draw(probs.float(), generator)  # (B,) index into the sorted list
        return ids.gather(-1, choice[:, None]).squeeze(1)  # (B,)

    return pick


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs (B, V), drawn with probability proportional to it: the inverse CDF at a
    uniform draw (torch.multinomial does the same sampling but takes 0.2 s on a CPU for 160 rows of 50,257)."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cdf[:, -1:]  # (B, 1)
    # the first position whose cdf exceeds u: a token with probability 0 never is one
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.size(-1) - 1).squeeze(1)  # (B,)


def _check_length(lm: GPT, prompt: torch.Tensor, max_new_tokens: int) -> None:
    # the last new token is returned, never fed, hence the - 1
    fed = prompt.size(1) + max_new_tokens - 1
    if fed > lm.config.block_size:
        raise UserError(
            f"prompt of {prompt.size(1)} tokens + max_new_tokens={max_new_tokens} needs {fed} positions; "
            f"the model's block_size is {lm.config.block_size}"
        )


class _Feed:
    """Next-token logits (R, n_vocab) float32 for R rows, fed one new token per row per step.

    prompt (R, T0), R = images × group; context (images, N, C) or None. With the cache only the new token goes
    through the LM; without it the whole sequence does (and each row gets its own copy of its image).
    """

    def __init__(self, lm, prompt, context, *, group, max_new_tokens, n_vocab, use_cache, cuda_graph):
        if cuda_graph and not (use_cache and prompt.device.type == "cuda"):
            raise UserError("cuda_graph=True needs use_cache=True and a model on a CUDA device")
        self.lm, self.n_vocab, self.seq = lm, n_vocab, prompt
        self.graphed = (
            _graphed_step(lm, prompt, context, group, max_new_tokens, n_vocab) if cuda_graph else None
        )
        if self.graphed is not None:
            self.cache = self.graphed.cache
        elif use_cache:
            self.cache = KVCache(prompt.size(1) + max_new_tokens - 1, group=group)
        else:
            self.cache = None
            if context is not None:
                context = context.repeat_interleave(group, dim=0)  # (R, N, C)
        self.context = context

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self.lm(idx, context=self.context, cache=self.cache)  # (R, T', V)
        return logits[:, -1, : self.n_vocab].float()

    def first(self) -> torch.Tensor:
        """The prompt's next-token logits (prefill)."""
        return self.logits(self.seq)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (R,); the logits after them."""
        if self.cache is None:
            self.seq = torch.cat([self.seq, tokens[:, None]], dim=1)  # (R, T + 1)
            return self.logits(self.seq)
        if self.graphed is not None:
            return self.graphed.replay(tokens, self.logits)
        return self.logits(tokens[:, None])

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (R,), in that order (beam search's parents)."""
        if self.cache is None:
            self.seq = self.seq.index_select(0, rows)
        else:
            self.cache.reorder(rows)


class _GraphedStep:
    """The one-token decode step captured once as a CUDA graph over a static cache, replayed each step.

    Replay runs the captured kernels on the captured addresses: the token goes in through `tokens`, the logits
    come out in `out`, the cache's device position advances inside the graph. Kept per LM and shape
    (`_graphed_step`), so a second batch of the same shape reuses the capture. It holds no reference to the LM
    (only the LM's kernels, inside the graph): the cache of steps is keyed by the LM and must let it be freed.
    """

    def __init__(self, rows: int, max_length: int, group: int, device: torch.device):
        self.cache = KVCache(max_length, group=group)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (R, 1)
        self.graph: torch.cuda.CUDAGraph | None = None

    def capture(self, logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Capture `logits(self.tokens)` (the feed's step) after the prefill, so every buffer exists. Warm-up steps
        run on a side stream (as CUDA graphs require) and are undone: their keys/values sit at a position the
        first real step overwrites."""
        cache, length, position = self.cache, self.cache.length, self.cache.position.clone()
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled("cuda"):  # autocast's weight-cast cache must not live inside a graph
            autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), autocast:
            for _ in range(2):
                logits(self.tokens)
                cache.length = length
                cache.position.copy_(position)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), autocast:
            self.out = logits(self.tokens)  # (R, n_vocab)
        cache.length = length  # capture ran the Python once and the kernels not at all

    def replay(self, tokens: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Feed tokens (R,); the logits after them. `logits` is captured on the first call only."""
        if self.graph is None:
            self.capture(logits)
        if self.cache.length + 1 > self.cache.max_length:
            raise UserError(f"KVCache holds {self.cache.max_length} positions; all are used")
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        self.cache.length += 1
        return self.out


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LM → {shape key: _GraphedStep}


def _graphed_step(lm, prompt, context, group, max_new_tokens, n_vocab) -> _GraphedStep:
    """The LM's step for this batch shape, made on first use (captured on its first replay); its cache reset
    for a new batch. (The step never reads the context itself: the image keys/values are in the cache after the
    prefill.)"""
    key = (
        prompt.shape,
        group,
        max_new_tokens,
        n_vocab,
        None if context is None else (context.shape, context.dtype),
        torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None,
        tuple(p.data_ptr() for p in lm.parameters()),  # weights moved or re-cast: capture again
    )
    steps = _GRAPHS.setdefault(lm, {})
    if key not in steps:
        steps.clear()  # one capture per LM: a new shape replaces the old graph and frees its memory
        max_length = prompt.size(1) + max_new_tokens - 1
        steps[key] = _GraphedStep(prompt.size(0), max_length, group, prompt.device)
    step = steps[key]
    step.cache.reset()
    return step


class _Finished:
    """Whether every row has finished, asked once per step without making the loop wait for the device: on
    CUDA the answer is copied to pinned memory asynchronously and read when it has arrived (a step or so later;
    the extra steps change nothing, finished rows are frozen). On the CPU it is read at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flag = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self.event: torch.cuda.Event | None = None

    def __call__(self, finished: torch.Tensor) -> bool:
        if not self.cuda:
            return bool(finished.all())
        if self.event is not None and self.event.query() and bool(self.flag):
            return True
        if self.event is None or self.event.query():
            self.flag.copy_(finished.all(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return False


@torch.no_grad()
def decode_loop(
    lm: GPT,
    prompt: torch.Tensor,
    pick: Pick,
    *,
    max_new_tokens: int,
    eot: int | None = None,
    context: torch.Tensor | None = None,
    use_cache: bool = True,
    cuda_graph: bool = False,
    n_vocab: int = N_VOCAB,
) -> torch.Tensor:
    """One token per step for every row, chosen by `pick` (argmax or a sampler).

    prompt (B, T0) ids; context (B, N, C) or None. Returns the new ids (B, n), n ≤ max_new_tokens: a row that
    emitted eot is padded with eot; decoding ends when every row has, or after max_new_tokens.
    """
    _check_length(lm, prompt, max_new_tokens)
    B, device = prompt.size(0), prompt.device
    feed = _Feed(
        lm,
        prompt,
        context,
        group=1,
        max_new_tokens=max_new_tokens,
        n_vocab=n_vocab,
        use_cache=use_cache,
        cuda_graph=cuda_graph,
    )
    tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # (B, max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    all_finished = _Finished(device)
    steps = 0
    for step in range(max_new_tokens):
        logits = feed.first() if step == 0 else feed.next(tokens[:, step - 1])  # (B, V)
        token = pick(logits)  # (B,)
        if eot is not None:
            token = token.masked_fill(finished, eot)
            finished = finished | (token == eot)
        tokens[:, step] = token
        steps = step + 1
        if eot is not None and all_finished(finished):
            break
    if eot is not None and device.type == "cuda":
        # the finished check may have arrived late: cut the steps after every row had emitted eot
        first_eot = torch.where(tokens[:, :steps] == eot, 1, 0).argmax(dim=1)  # (B,) 0 where none
        ended = (tokens[:, :steps] == eot).any(dim=1)  # (B,)
        if bool(ended.all()):
            steps = int(first_eot.max()) + 1
    return tokens[:, :steps]


def generate(
    lm: GPT,
    prompt: torch.Tensor,
    pick: Pick = argmax,
    *,
    max_new_tokens: int,
    eot: int,
    context: torch.Tensor | None = None,
    use_cache: bool = True,
    cuda_graph: bool = False,
    n_vocab: int = N_VOCAB,
) -> list[list[int]]:
    """Greedy decoding (pick=argmax, the default) or sampling (pick=sampler(...)). Returns per-row new ids,
    eot excluded."""
    tokens = decode_loop(
        lm,
        prompt,
        pick,
        max_new_tokens=max_new_tokens,
        eot=eot,
        context=context,
        use_cache=use_cache,
        cuda_graph=cuda_graph,
        n_vocab=n_vocab,
    )
    return _until_eot(tokens, eot)


def _until_eot(tokens: torch.Tensor, eot: int | None) -> list[list[int]]:
    """(B, n) ids → per-row lists cut before the first eot."""
    rows = tokens.tolist()
    return [row[: row.index(eot)] if eot in row else row for row in rows]


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
    cuda_graph: bool = False,
    n_vocab: int = N_VOCAB,
) -> list[list[int]]:
    """Beam search as transformers' `generate(num_beams=K, length_penalty=..., early_stopping=False,
    do_sample=False)`: a finished hypothesis scores sum log-prob / length**length_penalty (its eot counted in the
    length), and an example stops once its best running beam, at its current length, cannot beat the worst of its
    `num_beams` finished ones. Scores are float32 and normalised as transformers does, so the two agree token for
    token (tests/models/test_beam_oracle.py).

    prompt (B, T0); context (B, N, C) or None. Returns per-example best new ids, eot excluded.
    """
    if num_beams < 1:
        raise UserError(f"num_beams must be >= 1, got {num_beams!r}")
    _check_length(lm, prompt, max_new_tokens)
    B, K, L, device = prompt.size(0), num_beams, max_new_tokens, prompt.device
    if L == 0:
        return [[] for _ in range(B)]
    feed = _Feed(
        lm,
        prompt.repeat_interleave(K, dim=0),  # (B*K, T0): row b*K + j is beam j of example b
        context,
        group=K,
        max_new_tokens=L,
        n_vocab=n_vocab,
        use_cache=use_cache,
        cuda_graph=cuda_graph,
    )
    ranks = torch.arange(2 * K, device=device)  # (2K,)
    first_row = torch.arange(B, device=device)[:, None] * K  # (B, 1)
    beams = torch.arange(K, device=device).expand(B, K)  # (B, K)
    tokens = torch.zeros(B * K, L, dtype=torch.long, device=device)  # (B*K, L) running beams' new ids
    # All beams start as the same prompt: only beam 0 may expand on the first step, or we'd get K copies.
    scores = torch.full((B, K), float("-inf"), device=device)  # (B, K) sum log-prob per running beam
    scores[:, 0] = 0.0
    # Finished hypotheses, best first: normalised score, ids, length; `count` of them (at most K) per example.
    best = torch.full((B, K), float("-inf"), device=device)  # (B, K)
    best_tokens = torch.zeros(B, K, L, dtype=torch.long, device=device)  # (B, K, L)
    best_length = torch.zeros(B, K, dtype=torch.long, device=device)  # (B, K)
    count = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    all_done = _Finished(device)

    def keep_best(scores_in, tokens_in, length_in):
        """Merge candidates (B, M) after the current best (ties: earlier first, as Python's stable sort)."""
        order = torch.cat([best, scores_in], dim=1).sort(dim=1, descending=True, stable=True).indices[:, :K]
        merged_tokens = torch.cat([best_tokens, tokens_in], dim=1)  # (B, K + M, L)
        return (
            torch.cat([best, scores_in], dim=1).gather(1, order),
            merged_tokens.gather(1, order[:, :, None].expand(B, K, L)),
            torch.cat([best_length, length_in], dim=1).gather(1, order),
        )

    steps = 0
    for step in range(L):
        length = step + 1  # generated tokens after this step
        logits = feed.first() if step == 0 else feed.next(tokens[:, step - 1])  # (B*K, V)
        logprobs = logits.log_softmax(dim=-1)  # (B*K, V)
        V = logprobs.size(-1)
        candidates = (scores[:, :, None] + logprobs.view(B, K, V)).view(B, K * V)  # (B, K*V)
        # 2K candidates: at most K of them are eot (one per parent), so K running beams always survive
        top_scores, top_flat = candidates.topk(2 * K, dim=1)  # (B, 2K) each
        parent, token = top_flat // V, top_flat % V  # (B, 2K) each
        is_eot = token == eot  # (B, 2K)
        # an eot in the top K finishes a hypothesis (outside it, it is worse than K continuing beams: HF)
        finishing = is_eot & (ranks < K) & ~done[:, None]  # (B, 2K)
        normalised = top_scores / length**length_penalty  # (B, 2K)
        parent_tokens = tokens.view(B, K, L).gather(1, parent[:, :, None].expand(B, 2 * K, L))  # (B, 2K, L)
        best, best_tokens, best_length = keep_best(
            normalised.masked_fill(~finishing, float("-inf")),
            parent_tokens,  # only the first `step` ids are set: the eot itself is not part of the caption
            torch.full((B, 2 * K), step, dtype=torch.long, device=device),
        )
        count = (count + finishing.sum(dim=1)).clamp(max=K)
        # the K best candidates that are not eot continue, in rank order
        keep = (ranks + is_eot * 2 * K).topk(K, dim=1, largest=False).indices  # (B, K)
        parent, token, top_scores = parent.gather(1, keep), token.gather(1, keep), top_scores.gather(1, keep)
        best_running = top_scores[:, 0] / length**length_penalty  # (B,)
        done = done | ((count == K) & (best[:, -1] >= best_running))
        # a finished example keeps its shapes: its beams are fed eot and their outcome no longer matters
        parent = torch.where(done[:, None], beams, parent)
        token = torch.where(done[:, None], eot, token)
        scores = torch.where(done[:, None], 0.0, top_scores)
        rows = (first_row + parent).view(-1)  # (B*K,)
        tokens = tokens.index_select(0, rows)
        tokens[:, step] = token.view(-1)
        feed.reorder(rows)
        steps = step + 1
        if all_done(done):
            break
    # Out of steps: the running beams of unfinished examples compete with their finished hypotheses.
    running = (scores / steps**length_penalty).masked_fill(done[:, None], float("-inf"))  # (B, K)
    best, best_tokens, best_length = keep_best(
        running, tokens.view(B, K, L), torch.full((B, K), steps, dtype=torch.long, device=device)
    )
    lengths = best_length[:, 0].tolist()
    return [row[:n] for row, n in zip(best_tokens[:, 0].tolist(), lengths)]
