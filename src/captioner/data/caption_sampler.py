"""Which captions one rank visits in one epoch of the caption stage: shuffled by (seed, epoch), split across DDP
ranks, resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from captioner.data.coco_format import CaptionIndex
from captioner.errors import UserError


class CaptionSampler(Sampler[int]):
    """The caption indices one rank visits in one epoch, seeded by (seed, epoch), resumable by whole batches.

    mode "all": every caption once per epoch; mode "one": one caption per image, drawn per epoch. With `shuffle`
    the order is a permutation drawn from (seed, epoch); every rank draws the same one and takes every
    world_size-th item from its rank on (training drops the tail so all ranks get equally many batches, which
    DDP needs; validation keeps everything, so each pair counts exactly once).

    `skip_batches` drops the first batches of epoch `epoch` only (a mid-epoch resume) by slicing indices, so no
    image is decoded for them. `__len__` keeps counting them: Lightning resumes its own batch counter at the
    same place and ends the epoch when that counter reaches `len(dataloader)`.
    """

    def __init__(
        self,
        index: CaptionIndex,
        *,
        mode: str = "all",
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_tail: bool = True,
        batch_size: int = 1,
        skip_batches: int = 0,
    ):
        if mode not in ("all", "one"):
            raise UserError(f"captions_per_epoch must be 'all' or 'one', got {mode!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside world size {world_size}")
        self.index, self.mode, self.shuffle, self.seed = index, mode, shuffle, seed
        self.rank, self.world_size, self.drop_tail, self.batch_size = rank, world_size, drop_tail, batch_size
        self.epoch, self.skip_batches = epoch, skip_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip_batches = 0  # the resume offset belongs to the epoch that was interrupted
        self.epoch = epoch

    def epoch_order(self) -> np.ndarray:
        """All ranks' caption indices for this epoch, before the rank split."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "all":
            order = np.arange(len(self.index.caption_image))
            return rng.permutation(order) if self.shuffle else order
        counts = np.diff(self.index.offsets)
        images = np.flatnonzero(counts)  # images without captions have nothing to train on
        picks = self.index.offsets[images] + (rng.random(len(images)) * counts[images]).astype(np.int64)
        return rng.permutation(picks) if self.shuffle else picks

    def rank_order(self) -> np.ndarray:
        order = self.epoch_order()
        if self.drop_tail:
            order = order[: len(order) // self.world_size * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.rank_order()[self.skip_batches * self.batch_size :]
        return iter(order.tolist())

    def __len__(self) -> int:
        # "one" draws a caption for every image that has one
        n = (
            len(self.index.caption_image)
            if self.mode == "all"
            else int(np.count_nonzero(np.diff(self.index.offsets)))
        )
        if self.drop_tail:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))
