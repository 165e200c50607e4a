"""The keys and values a decoder keeps between steps, so each step feeds only its new tokens.

Shapes: R rows (images × beams), I images, G rows per image (beams), nh heads, hs head size, S max_length,
T new positions, N image tokens.

The cache is static: each layer's buffers are allocated once, on the first write, for all S positions, and
written in place; attention reads all S positions with a mask hiding those not written yet. Every decode step
then has the same shapes and the same memory addresses, which is what a CUDA graph replays (gpt-fast's and
transformers' StaticCache do the same). The buffers belong to the cache alone: nothing outside it keeps them.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values kept between decoding steps, for `max_length` positions of every row.

    `self_attn[layer]`: (k, v) buffers, each (R, nh, S, hs); positions >= `length` hold nothing yet.
    `cross_attn[layer]`: the image tokens' (k, v), each (I, nh, N, hs): they depend on the image only, so they are
    computed on the first step, once per image, and shared by its `group` consecutive rows (its beams).
    `length`: positions fed so far (a Python int, for bounds checks); `position`: the same count as a 0-d device
    tensor, advanced in place, so a step captured in a CUDA graph advances it on every replay.
    """

    def __init__(self, max_length: int, group: int = 1):
        if max_length < 1 or group < 1:
            raise ValueError(f"KVCache needs max_length >= 1 and group >= 1, got {max_length!r}, {group!r}")
        self.max_length = max_length
        self.group = group
        self.self_attn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross_attn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0
        self.position: torch.Tensor | None = None
        self._images_stored: set[int] = set()

    def reset(self) -> None:
        """Start a new batch of the same shapes, reusing every buffer (a replayed CUDA graph reads them)."""
        self.length = 0
        if self.position is not None:
            self.position.zero_()
        self._images_stored.clear()

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """The positions (T,) of the next T tokens fed; checks they fit."""
        if self.length + T > self.max_length:
            raise ValueError(f"KVCache holds {self.max_length} positions; {self.length} + {T} do not fit")
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=device)
        return self.position + torch.arange(T, device=device)  # (T,)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(T, S) True where the query at `positions[t]` may attend: every written position up to its own."""
        return torch.arange(self.max_length, device=positions.device) <= positions[:, None]  # (T, S)

    def advance(self, T: int) -> None:
        self.position.add_(T)
        self.length += T

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (R, nh, T, hs) keys/values at `positions` (T,); return the (R, nh, S, hs) buffers."""
        if layer not in self.self_attn:
            R, nh, _, hs = k.shape
            self.self_attn[layer] = tuple(k.new_zeros(R, nh, self.max_length, hs) for _ in range(2))
        buf_k, buf_v = self.self_attn[layer]
        buf_k.index_copy_(2, positions, k)
        buf_v.index_copy_(2, positions, v)
        return buf_k, buf_v

    def cached_image_kv(self, layer: int, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """The image keys/values of `layer`: `compute()` on the layer's first call since the cache was made or
        reset (written into the buffers a previous batch left, if any), the stored ones afterwards."""
        if layer not in self._images_stored:
            k, v = compute()
            stored = self.cross_attn.get(layer)
            if stored is not None and stored[0].shape == k.shape and stored[0].dtype == k.dtype:
                stored[0].copy_(k)
                stored[1].copy_(v)
            else:
                self.cross_attn[layer] = (k, v)
            self._images_stored.add(layer)
        return self.cross_attn[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (LongTensor (R,)), in that order: beam search's parent beams. Beams never leave their
        image, so the shared image keys/values stay as they are."""
        for buf_k, buf_v in self.self_attn.values():
            buf_k.copy_(buf_k.index_select(0, rows))
            buf_v.copy_(buf_v.index_select(0, rows))
