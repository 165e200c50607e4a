"""Training throughput (tokens/s over all ranks) and model FLOPs utilisation, logged per optimizer step.

MFU = achieved model FLOPs / peak FLOPs, with the model FLOPs per token from the module (e.g. 6N + attention, as in
the PaLM paper's appendix B) and the peak from a small table of dense bf16 tensor-core figures.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch

# Dense (no sparsity) bf16 peak FLOP/s per GPU, from the vendors' data sheets. Matched on whole words of
# torch.cuda.get_device_name, first match wins, so the more specific names come first ("L4" must not match "L40S").
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)


def peak_flops_for(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a GPU from its name, e.g. "NVIDIA H100 80GB HBM3" -> 989e12; None when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", device_name):
            return flops
    return None


def default_peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of the accelerator the module runs on; None on CPU or an unlisted GPU (then no MFU)."""
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


def batch_tokens(batch) -> int:
    """Tokens in one micro-batch: the number of elements of its input ids.

    Accepts a tensor of ids, a tuple/list whose first element holds the ids (x, y), or a dict with "input_ids".
    """
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise KeyError(f"batch dict has no 'input_ids' (keys: {sorted(batch)}); pass tokens_per_batch_fn")
        ids = batch["input_ids"]
    elif isinstance(batch, (tuple, list)) and batch:
        ids = batch[0]
    else:
        ids = batch
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"cannot count tokens in a batch of {type(ids).__name__}; pass tokens_per_batch_fn")
    return ids.numel()


class ThroughputCallback(pl.Callback):
    """Log `train/tokens_per_sec` and (where the peak is known) `train/mfu` every `log_every_n_steps` steps.

    The clock runs from one optimizer step's end to the next, so data loading and the optimizer are included;
    validation inside that span is subtracted, and the first step of each fit (compilation, warm-up) is not
    measured. Tokens are counted per micro-batch and multiplied by the world size (every rank sees as many).
    """

    def __init__(
        self,
        tokens_per_batch_fn: Callable[[object], int] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        log_every_n_steps: int = 1,
    ):
        super().__init__()
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.tokens_per_batch_fn = tokens_per_batch_fn or batch_tokens
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.log_every_n_steps = log_every_n_steps
        self._reset()

    def _reset(self) -> None:
        self._last_step: int | None = None  # global_step at the previous on_train_batch_end
        self._window_start: float | None = None  # clock at the start of the current measuring window
        self._window_tokens = 0  # tokens of this rank since _window_start
        self._val_start: float | None = None

    def _clock(self, pl_module: pl.LightningModule) -> float:
        # CUDA runs asynchronously: wait for the queued work, or the clock measures only the launches
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self._last_step = trainer.global_step  # not 0 when resuming
        if self.flops_per_token is None and callable(getattr(pl_module, "flops_per_token", None)):
            self.flops_per_token = float(pl_module.flops_per_token())
        if self.peak_flops is None:
            self.peak_flops = default_peak_flops(pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        self._window_tokens += int(self.tokens_per_batch_fn(batch))
        step = trainer.global_step
        if step == self._last_step:  # still accumulating gradients
            return
        self._last_step = step
        now = self._clock(pl_module)
        if self._window_start is None:  # first step of this fit: start measuring from here
            self._window_start, self._window_tokens = now, 0
            return
        if step % self.log_every_n_steps != 0:
            return
        elapsed = now - self._window_start
        tokens_per_sec = self._window_tokens * trainer.world_size / elapsed
        self._window_start, self._window_tokens = now, 0
        pl_module.log("train/tokens_per_sec", tokens_per_sec, on_step=True, on_epoch=False, logger=True)
        if self.flops_per_token is not None and self.peak_flops is not None:
            mfu = tokens_per_sec * self.flops_per_token / (self.peak_flops * trainer.world_size)
            pl_module.log("train/mfu", mfu, on_step=True, on_epoch=False, logger=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window_start is not None:
            self._val_start = self._clock(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None and self._window_start is not None:
            # move the window start forward by the validation time, so that time is not counted as training
            self._window_start += self._clock(pl_module) - self._val_start
        self._val_start = None
