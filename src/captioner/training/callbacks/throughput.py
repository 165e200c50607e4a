"""Training throughput (tokens/s over all ranks) and model FLOPs utilisation, logged per optimizer step.

MFU = model FLOPs actually computed / (elapsed time × the GPU's peak at the precision in use). The FLOPs come from
the module's `flops_per_batch(batch)` (PaLM appendix B's 6N + attention, per part: what trains, what only passes
gradients on, what only runs forward; see the modules), the peak from a table of vendor data-sheet figures.

Lightning's own ThroughputMonitor is not used: it logs through the logger connector rather than `self.log`, so its
numbers never reach `trainer.callback_metrics` (which the progress display reads); it reads a `flops_per_batch`
attribute, not a function of the batch, while caption batches differ (cached features or pixels, caption length);
and its table misses "NVIDIA H200" (it expects "sxm1"/"nvl1" in the name) and lists H200 figures with sparsity.
`measure_flops` counts FLOPs by running the model under a FLOP counter; the tests use it to check the modules'
analytic counts, which cost nothing at run time and need no meta-device copy of the model or extra step.
"""

from __future__ import annotations

import re
import time

import lightning.pytorch as pl
import torch

from captioner.errors import UserError

# Dense (no sparsity) peak FLOP/s per GPU from the vendors' data sheets: (bf16 tensor core, tf32 tensor core,
# fp32). Matched on whole words of torch.cuda.get_device_name, first match wins, so the more specific names come
# first ("L4" must not match "L40S").
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12, 51e12),
    ("H100", 989e12, 495e12, 67e12),  # SXM
    ("H200", 989e12, 495e12, 67e12),  # SXM: the H100's GH100 compute with more memory
    ("A100", 312e12, 156e12, 19.5e12),
    ("A10G", 125e12, 62.5e12, 31.2e12),  # NVIDIA publishes an A10 data sheet only; these are its figures
    ("L4", 121e12, 60e12, 30.3e12),
    ("RTX 4090", 165e12, 82.6e12, 82.6e12),  # Ada whitepaper; bf16 with fp32 accumulate
)
PRECISION_COLUMN = {"bf16": 1, "tf32": 2, "fp32": 3}


def peak_flops_for(device_name: str, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of a GPU from its name at "bf16", "tf32" or "fp32", e.g. ("NVIDIA H100 80GB HBM3", "bf16") ->
    989e12; None when the GPU is unknown."""
    for row in PEAK_FLOPS:
        if re.search(rf"(?<![\w]){re.escape(row[0])}(?![\w])", device_name):
            return row[PRECISION_COLUMN[precision]]
    return None


def matmul_precision(trainer_precision: str) -> str | None:
    """The tensor-core format that the bulk of the matmuls run in under a Lightning precision setting: bf16 for
    bf16/16 (mixed or true; fp16's peak equals bf16's on every listed GPU); for 32-true, tf32 unless
    `torch.set_float32_matmul_precision("highest")` keeps fp32 matmuls; None for anything else (64, fp8)."""
    name = str(trainer_precision)
    if name.startswith(("bf16", "16")):
        return "bf16"
    if name.startswith("32"):
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def default_peak_flops(device: torch.device, trainer_precision: str = "bf16-mixed") -> float | None:
    """Peak FLOP/s of the accelerator the module runs on at the trainer's precision; None on CPU, an unlisted GPU
    or an unlisted precision (then no MFU)."""
    precision = matmul_precision(trainer_precision)
    if device.type != "cuda" or precision is None:
        return None
    return peak_flops_for(torch.cuda.get_device_name(device), precision)


def batch_tokens(batch) -> int:
    """Tokens in one micro-batch: the number of elements of its input ids (caption padding included: the
    transformer computes those positions too).

    Accepts a tensor of ids, a tuple/list whose first element holds the ids (x, y), or a dict with "input_ids".
    """
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise KeyError(f"batch dict has no 'input_ids' (keys: {sorted(batch)}): no tokens to count")
        ids = batch["input_ids"]
    elif isinstance(batch, (tuple, list)) and batch:
        ids = batch[0]
    else:
        ids = batch
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"cannot count tokens in a batch of {type(ids).__name__}")
    return ids.numel()


class ThroughputCallback(pl.Callback):
    """Log `train/tokens_per_sec` and (where FLOPs and peak are known) `train/mfu` every `log_every_n_steps` steps.

    The clock runs from one optimizer step's end to the next, so data loading and the optimizer are included;
    validation inside that span is subtracted, and the first step of each fit (compilation, warm-up) is not
    measured. Tokens and FLOPs are counted per micro-batch; tokens are multiplied by the world size (every rank
    sees as many), and MFU compares one rank's FLOP/s with one GPU's peak.

    FLOPs per micro-batch: the module's `flops_per_batch(batch)` (no MFU without one); it may return a 0-d tensor
    (e.g. a count of targets), summed on the device and read once per logged step, after the clock's synchronize,
    so counting adds no host sync. peak_flops: per GPU; by default from `PEAK_FLOPS` at the
    trainer's precision.
    """

    def __init__(self, peak_flops: float | None = None, log_every_n_steps: int = 1):
        super().__init__()
        if log_every_n_steps < 1:
            raise UserError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.peak_flops = peak_flops
        self.log_every_n_steps = log_every_n_steps
        self._flops_fn = None
        self._peak = peak_flops
        self._reset()

    def _reset(self) -> None:
        self._last_step: int | None = None  # global_step at the previous on_train_batch_end
        self._window_start: float | None = None  # clock at the start of the current measuring window
        self._window_tokens = 0  # tokens of this rank since _window_start
        self._window_flops: float | torch.Tensor = 0.0  # FLOPs of this rank since _window_start
        self._val_start: float | None = None

    def _clock(self, pl_module: pl.LightningModule) -> float:
        # CUDA runs asynchronously: wait for the queued work, or the clock measures only the launches
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self._last_step = trainer.global_step  # not 0 when resuming
        self._flops_fn = getattr(pl_module, "flops_per_batch", None)
        self._peak = self.peak_flops
        if self._peak is None:
            self._peak = default_peak_flops(pl_module.device, trainer.precision)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        self._window_tokens += batch_tokens(batch)
        if self._flops_fn is not None and self._peak is not None:
            self._window_flops = self._window_flops + self._flops_fn(batch)
        step = trainer.global_step
        if step == self._last_step:  # still accumulating gradients
            return
        self._last_step = step
        if self._window_start is None:  # first step of this fit: start measuring from here
            self._window_start, self._window_tokens, self._window_flops = self._clock(pl_module), 0, 0.0
            return
        if step % self.log_every_n_steps != 0:
            return  # no clock read: on a GPU it waits for the device
        now = self._clock(pl_module)
        elapsed = now - self._window_start
        tokens_per_sec = self._window_tokens * trainer.world_size / elapsed
        flops = float(self._window_flops)
        self._window_start, self._window_tokens, self._window_flops = now, 0, 0.0
        pl_module.log("train/tokens_per_sec", tokens_per_sec, on_step=True, on_epoch=False, logger=True)
        if self._flops_fn is not None and self._peak is not None:
            pl_module.log(
                "train/mfu", flops / elapsed / self._peak, on_step=True, on_epoch=False, logger=True
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window_start is not None:
            self._val_start = self._clock(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None and self._window_start is not None:
            # move the window start forward by the validation time, so that time is not counted as training
            self._window_start += self._clock(pl_module) - self._val_start
        self._val_start = None
