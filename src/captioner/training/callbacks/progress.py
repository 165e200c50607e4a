"""Training progress in optimizer steps: a rich bar on a terminal, one plain line every N steps elsewhere.

Lightning's bar counts micro-batches, and with endless train loaders (max_epochs=-1) it has no total and no ETA.
RichProgressBar only changes the drawing: its tasks are advanced per batch in every hook, so a subclass giving
steps would override nearly all of it. This callback counts `trainer.global_step` against `trainer.max_steps`
instead, and shows what the module and ThroughputCallback already log each optimizer step (loss, lr, gradient
norm, tokens/s, MFU, skipped steps), read from `trainer.callback_metrics` together: one host sync per optimizer
step in bar mode, one per printed line otherwise. It runs on rank zero only; configs turn Lightning's bar off.

A line (SLURM logs, pipes; `mode="lines"`), after build-nanogpt's:
    step  120/600 | loss 3.2100 | lr 6.0e-04 | norm 0.512 | dt 412ms | tok/s 1,270,000 | mfu 38.1% | eta 3m18s
Validation shows as a phase: "validating…" while it runs (with a ticking time on the bar), then its duration
and the val/* metrics.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

from captioner.errors import UserError

# What a step shows, in order: metric, format. dt is inserted after the gradient norm.
STEP_FIELDS = (
    ("train/loss", "loss {:.4f}"),
    ("train/lr", "lr {:.1e}"),
    ("train/grad_norm", "norm {:.3f}"),
    ("train/tokens_per_sec", "tok/s {:,.0f}"),
    ("train/mfu", "mfu {:.1%}"),
)
STEP_KEYS = [key for key, _ in STEP_FIELDS] + ["train/skipped_steps"]
MODES = ("auto", "bar", "lines")


def read_scalars(metrics: Mapping, keys: Iterable[str]) -> dict[str, float]:
    """The `keys` present in `metrics` as floats, copied to the host in one transfer (one sync, not one each)."""
    present = [k for k in keys if k in metrics]
    if not present:
        return {}
    values = [torch.as_tensor(metrics[k]).detach().float().reshape(()) for k in present]
    device = values[0].device
    return dict(zip(present, torch.stack([v.to(device) for v in values]).tolist()))


def format_duration(seconds: float) -> str:
    """4.2s, 12s, 3m05s, 2h07m."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_stats(stats: Mapping[str, float], dt: float | None) -> str:
    """`loss 3.2100 | lr 6.0e-04 | norm 0.512 | dt 412ms | tok/s 1,270,000 | …`; absent values are left out."""
    parts = []
    for key, fmt in STEP_FIELDS:
        if key == "train/tokens_per_sec" and dt is not None:
            parts.append(f"dt {dt * 1000:.0f}ms")
        if key in stats:
            parts.append(fmt.format(stats[key]))
    if stats.get("train/skipped_steps"):
        parts.append(f"skipped {stats['train/skipped_steps']:.0f}")
    return " | ".join(parts)


class InfoColumn(ProgressColumn):
    """The step's metrics; while validating, "validating… 12s", re-rendered by rich's refresh thread so that the
    time ticks through a long HellaSwag or caption generation."""

    def render(self, task) -> Text:
        start = task.fields.get("val_start")
        if start is not None:
            return Text(f"validating… {format_duration(time.perf_counter() - start)}", style="yellow")
        return Text(task.fields.get("info", ""))


class StepProgress(pl.Callback):
    """Progress in optimizer steps with total, ETA and the last step's metrics (dt: its duration, as tok/s).

    every_n_steps: a plain line every N optimizer steps (and at the last one) in lines mode.
    mode: "bar" (rich, redrawn in place), "lines", or "auto": bar when stdout is a terminal, lines otherwise.
    The ETA is the mean time per step over the last `window` steps (validation excluded) times the steps left,
    plus the validations still due at the duration of the last one.
    """

    def __init__(self, every_n_steps: int = 10, mode: str = "auto", window: int = 100):
        super().__init__()
        if every_n_steps < 1:
            raise UserError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.every_n_steps = every_n_steps
        self.mode = mode
        self._marks: deque[tuple[int, float]] = deque(maxlen=max(2, window))  # (step, train clock) per step
        self._progress = None  # rich Progress while the bar is shown
        self._task = None
        self._log_streams: list[tuple[logging.StreamHandler, object]] = []  # to restore when the bar stops
        self._reset()

    def _reset(self) -> None:
        self._marks.clear()
        self._step: int | None = None
        self._total: int | None = None
        self._val_start: float | None = None
        # a validation pause inside fit: from the start of validation until training resumes
        self._paused_since: float | None = None
        self._val_seconds = 0.0  # validation pauses of this fit, kept off the train clock
        self._last_val_seconds: float | None = None

    def _bar_mode(self) -> bool:
        return self.mode == "bar" or (self.mode == "auto" and sys.stdout.isatty())

    def _train_clock(self) -> float:
        return time.perf_counter() - self._val_seconds

    def _prefix(self, step: int) -> str:
        if self._total is None:
            return f"step {step}"
        return f"step {step:>{len(str(self._total))}}/{self._total}"

    def _emit(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, flush=True)

    # --- timing ----------------------------------------------------------------------------------------------
    def _seconds_per_step(self, last_n: int | None = None) -> float | None:
        marks = list(self._marks)[-(last_n + 1) :] if last_n else list(self._marks)
        if len(marks) < 2:
            return None
        (s0, t0), (s1, t1) = marks[0], marks[-1]
        return (t1 - t0) / (s1 - s0)

    def _eta(self, trainer: pl.Trainer, step: int) -> float | None:
        per_step = self._seconds_per_step()
        if self._total is None or per_step is None or step >= self._total:
            return None
        eta = (self._total - step) * per_step
        # validation cadence: micro-batches (as captioner-train sets it), or a float fraction of an epoch
        interval = trainer.val_check_interval
        if self._last_val_seconds is not None and isinstance(interval, int):
            every = max(1, interval // trainer.accumulate_grad_batches)
            eta += (self._total // every - step // every) * self._last_val_seconds
        return eta

    # --- training ----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._reset()
        self._step = trainer.global_step  # not 0 when resuming
        self._total = trainer.max_steps if trainer.max_steps > 0 else None
        if self._bar_mode():
            self._start_bar(completed=self._step)
        else:
            self._emit(f"{self._prefix(self._step)} | {'resuming' if self._step else 'starting'} training")

    def _start_bar(self, completed: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            InfoColumn(table_column=Column(no_wrap=True)),  # one line: a wrapped bar leaves copies behind
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("train", total=self._total, completed=completed, info="")
        streams = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
        self._progress.start()  # from here sys.stdout/stderr are rich's proxies, which print above the bar
        self._log_streams = _redirect_log_handlers(streams)

    def _stop_bar(self) -> None:
        if self._progress is not None:
            for handler, stream in self._log_streams:
                handler.setStream(stream)
            self._progress.stop()
            self._progress = self._task = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._step:  # other ranks; or still accumulating gradients
            return
        self._step = step
        self._marks.append((step, self._train_clock()))
        line_due = step % self.every_n_steps == 0 or step == self._total
        if self._progress is None and not line_due:
            return
        stats = format_stats(read_scalars(trainer.callback_metrics, STEP_KEYS), self._seconds_per_step(1))
        eta = self._eta(trainer, step)
        eta = [] if eta is None else [f"eta {format_duration(eta)}"]
        if self._progress is not None:  # the ETA first, where a narrow terminal still shows it
            self._progress.update(self._task, completed=step, info=" | ".join([*eta, stats]))
        else:
            self._emit(" | ".join([self._prefix(step), stats, *eta]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_bar()

    # --- validation --------------------------------------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._val_start = time.perf_counter()
        if trainer.state.fn == TrainerFn.FITTING:
            self._paused_since = self._val_start
        if self._progress is not None:
            self._progress.update(self._task, val_start=self._val_start)  # the info column ticks
        else:
            self._emit(f"{self._prefix(trainer.global_step)} | validating…")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._val_start is None:
            return
        seconds = time.perf_counter() - self._val_start
        self._val_start = None
        metrics = trainer.callback_metrics
        values = read_scalars(metrics, sorted(k for k in metrics if k.startswith("val/")))
        parts = [f"validation {format_duration(seconds)}"] + [f"{k} {v:.4f}" for k, v in values.items()]
        if self._progress is not None:
            self._progress.update(self._task, val_start=None)
        self._emit(f"{self._prefix(trainer.global_step)} | {' | '.join(parts)}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx):
        # The pause for validation ends here, not at on_validation_end: callbacks that run after this one there
        # (text samples, gallery, checkpoints) belong to it too. Kept off the train clock, it enters the ETA.
        if self._paused_since is not None:
            self._last_val_seconds = time.perf_counter() - self._paused_since
            self._val_seconds += self._last_val_seconds
            self._paused_since = None

    # --- the bar ends with the fit, however it ends --------------------------------------------------------------
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop_bar()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_bar()


def _redirect_log_handlers(streams: dict[int, str]) -> list[tuple[logging.StreamHandler, object]]:
    """Point logging's console handlers (Hydra's on stdout, Lightning's on stderr), which hold the streams they
    were created with, at the current sys.stdout/sys.stderr: their lines then print above the live bar instead
    of being overdrawn by it. `streams` maps id(original stream) to its name; returns (handler, original)."""
    # the root and every named logger (placeholders in loggerDict have no handlers)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    swapped = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is not logging.StreamHandler or id(handler.stream) not in streams:
                continue
            proxy = getattr(sys, streams[id(handler.stream)])
            if proxy is not handler.stream:  # rich redirects only on a terminal
                swapped.append((handler, handler.setStream(proxy)))
    return swapped
