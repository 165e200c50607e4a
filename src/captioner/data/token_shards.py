"""The stage-1 DataModule over uint16 token shards, ours (`.npy`) or llm.c's (`.bin`): the formats are
`data/shards.py` and `data/llmc_shards.py`; batches, their order and resume do not depend on which.

A shard of n tokens holds (n - 1) // T windows of T + 1 tokens at stride T, as in build-nanogpt: window j is
tokens[j*T : j*T + T + 1], giving x = w[:-1] and y = w[1:]. Windows never cross a shard boundary, so every read
is one slice of one memory-mapped file and memory stays flat however many shards there are.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from captioner.data.shards import DEFAULT_PREPARE_HINT, list_shards, load_shard
from captioner.errors import UserError


def windows_in(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len that fit in n_tokens."""
    return max(0, (n_tokens - 1) // seq_len)


class _ShardReader:
    """Opens shards lazily, once per process (memmaps are not sent to DataLoader workers), and reads windows."""

    def __init__(self, paths: list[Path], seq_len: int):
        self.paths = [str(p) for p in paths]
        self.seq_len = seq_len
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def batch(self, shards: np.ndarray, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack window `windows[i]` of shard `shards[i]` into x, y of shape (B, T) int64."""
        T = self.seq_len
        rows = []
        for s, w in zip(shards.tolist(), windows.tolist()):
            if s not in self._maps:
                self._maps[s] = load_shard(self.paths[s])
            rows.append(self._maps[s][w * T : w * T + T + 1])
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T), (B, T)


class TrainWindowStream(IterableDataset):
    """Infinite, deterministic stream of (x, y) micro-batches, each (B, T) int64, for one DDP rank.

    The global stream is epoch 0, epoch 1, ... concatenated; epoch e visits every window once, in an order drawn
    from (seed, e): shards in a permuted order, and within shard s its windows permuted from (seed, e, s). Rank r
    of W takes global windows r, r + W, r + 2W, ...; its micro-batch b is its windows b*B ... b*B + B - 1.
    Batch b is computed directly from b (index arithmetic, no iteration over earlier data), so the stream can
    start at any `start_batch`. DataLoader worker w of nw yields batches start_batch + w, + w + nw, ... and the
    DataLoader interleaves workers round-robin, so the order is the same for any num_workers.
    """

    def __init__(
        self,
        paths: list[Path],
        lengths: list[int],
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 1337,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        self.reader = _ShardReader(paths, seq_len)
        self.counts = np.array([windows_in(n, seq_len) for n in lengths], dtype=np.int64)
        self.n_windows = int(self.counts.sum())
        if self.n_windows == 0:
            raise UserError(
                f"seq_len={seq_len} needs shards of at least {seq_len + 1} tokens; the longest of "
                f"{len(paths)} shard(s) ({paths[0].parent}) has {max(lengths)}"
            )
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    @functools.lru_cache(maxsize=2)  # noqa: B019 (small, bounded; keyed by instance)
    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard visiting order for `epoch` and the exclusive cumulative window counts along it."""
        order = np.arange(len(self.counts))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])
        return order, starts

    @functools.lru_cache(maxsize=4)  # noqa: B019 (4: a batch can straddle shards and epochs)
    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.counts[shard])
        return np.random.default_rng([self.seed, epoch, shard]).permutation(self.counts[shard])

    def locate(self, g: int) -> tuple[int, int]:
        """(shard, window) of the g-th window of the global stream."""
        epoch, k = divmod(g, self.n_windows)
        order, starts = self._epoch_plan(epoch)
        # side="right" then -1 skips shards with zero windows (equal starts) to the one that holds k
        pos = int(np.searchsorted(starts, k, side="right")) - 1
        shard = int(order[pos])
        return shard, int(self._window_order(epoch, shard)[k - starts[pos]])

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch b: x, y of shape (B, T) int64."""
        B, W = self.batch_size, self.world_size
        located = [self.locate((b * B + j) * W + self.rank) for j in range(B)]
        shards, windows = np.array(located).T
        return self.reader.batch(shards, windows)

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start_batch + worker
        while True:
            yield self.batch(b)
            b += n_workers


class ValWindows(Dataset):
    """The first `n_windows` windows of the val shards (in file order, stride T), split across ranks.

    Rank r of W takes windows r, r + W, ... of the first (n_windows // W) * W, so every rank evaluates the same
    number of windows and none is counted twice (at most W - 1 windows are dropped). Item i is this rank's
    micro-batch i, (x, y) of shape (B, T) int64; the last one may be smaller than B.
    """

    def __init__(self, paths, lengths, seq_len, batch_size, n_windows, *, rank=0, world_size=1):
        self.reader = _ShardReader(paths, seq_len)
        counts = np.array([windows_in(n, seq_len) for n in lengths], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        if self.starts[-1] == 0:
            raise UserError(
                f"seq_len={seq_len} needs val shards of at least {seq_len + 1} tokens; the longest of "
                f"{len(paths)} shard(s) ({paths[0].parent}) has {max(lengths)}"
            )
        n_windows = min(n_windows, int(self.starts[-1]))
        self.per_rank = n_windows // world_size
        if self.per_rank == 0:
            raise UserError(f"val: {n_windows} window(s) to evaluate, fewer than world_size={world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        local = np.arange(i * self.batch_size, min((i + 1) * self.batch_size, self.per_rank))
        g = local * self.world_size + self.rank
        shards = np.searchsorted(self.starts, g, side="right") - 1
        return self.reader.batch(shards, g - self.starts[shards])


# ----------------------------------------------------------------------------------------------------------------
# DataModule


class TokenShardDataModule(L.LightningDataModule):
    """Stage-1 data: token shards in `data_dir` (`.npy` or llm.c's `.bin`) → (x, y) int64 micro-batches (B, T).

    Training is an infinite stream (see `TrainWindowStream`): configure the Trainer with `max_steps`, an integer
    `val_check_interval`, `check_val_every_n_epoch=None` and `use_distributed_sampler=False` (ranks are split
    here). Its position is saved in every checkpoint (`state_dict`) and restored before the loader is built.
    """

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int = 1024,
        micro_batch_size: int = 8,
        total_batch_tokens: int = 524_288,
        val_tokens: int = 10_485_760,
        num_workers: int = 0,
        seed: int = 1337,
        shuffle: bool = True,
        prepare_hint: str = DEFAULT_PREPARE_HINT,
    ):
        super().__init__()
        for key, value in [("seq_len", seq_len), ("micro_batch_size", micro_batch_size)]:
            if value < 1:
                raise UserError(f"{key} must be >= 1, got {value}")
        data_dir = str(data_dir)  # hparams stay plain data (a Path would not load with weights_only=True)
        self.save_hyperparameters()
        self.start_batch = 0  # micro-batches of this rank to skip: set by load_state_dict (resume) or by hand
        self._shards: dict[str, tuple[list[Path], list[int]]] = {}

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step so that one step sees total_batch_tokens across all ranks."""
        hp = self.hparams
        per_pass = hp.micro_batch_size * hp.seq_len * world_size
        if hp.total_batch_tokens <= 0 or hp.total_batch_tokens % per_pass:
            raise UserError(
                f"total_batch_tokens={hp.total_batch_tokens} must be a positive multiple of "
                f"micro_batch_size={hp.micro_batch_size} × seq_len={hp.seq_len} × world_size={world_size} "
                f"= {per_pass}"
            )
        return hp.total_batch_tokens // per_pass

    def shards(self, split: str) -> tuple[list[Path], list[int]]:
        """Paths and token counts of a split's shards, every one validated (cached)."""
        if split not in self._shards:
            paths = list_shards(self.hparams.data_dir, split, self.hparams.prepare_hint)
            self._shards[split] = paths, [len(load_shard(p)) for p in paths]
        return self._shards[split]

    def setup(self, stage: str | None = None) -> None:
        # fail at setup, on every rank, rather than at the first batch
        if stage in (None, "fit"):
            self.train_dataset()
        if stage in (None, "fit", "validate"):
            self.val_dataset()

    def train_dataset(self) -> TrainWindowStream:
        rank, world = self._rank_world()
        hp = self.hparams
        return TrainWindowStream(
            *self.shards("train"),
            hp.seq_len,
            hp.micro_batch_size,
            seed=hp.seed,
            shuffle=hp.shuffle,
            rank=rank,
            world_size=world,
            start_batch=self.start_batch,
        )

    def val_dataset(self) -> ValWindows:
        rank, world = self._rank_world()
        hp = self.hparams
        n_windows = hp.val_tokens // hp.seq_len
        if n_windows == 0:
            raise UserError(f"val_tokens={hp.val_tokens} is less than one window of seq_len={hp.seq_len}")
        return ValWindows(
            *self.shards("val"), hp.seq_len, hp.micro_batch_size, n_windows, rank=rank, world_size=world
        )

    def _loader(self, dataset) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=None,  # the datasets yield whole micro-batches
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset())

    def state_dict(self) -> dict:
        """Micro-batches this rank has consumed (saved by Lightning into every checkpoint).

        `windows_consumed` (all ranks together) lets a run resume on a different number of devices or with a
        different micro-batch size as long as total_batch_tokens is unchanged.
        """
        trainer = self.trainer
        if trainer is None:
            batches = self.start_batch
        else:
            batches = trainer.global_step * trainer.accumulate_grad_batches
        _, world = self._rank_world()
        return {
            "batches_consumed": batches,
            "windows_consumed": batches * self.hparams.micro_batch_size * world,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the training stream where the checkpoint left it."""
        _, world = self._rank_world()
        per_batch = self.hparams.micro_batch_size * world
        windows = state_dict.get("windows_consumed")
        if windows is not None and windows % per_batch == 0:
            self.start_batch = windows // per_batch
        elif windows is not None:
            raise UserError(
                f"checkpoint consumed {windows} windows, not a multiple of micro_batch_size × world_size = "
                f"{per_batch}; resume with the micro-batch size and device count of the original run"
            )
        else:
            self.start_batch = int(state_dict["batches_consumed"])
