"""PNG plots of a run's metrics.csv (loss, HellaSwag, caption scores, learning rate), written to <run_dir>/plots/.

`plot_metrics` is a pure function (the CLI and tests call it); `PlotsCallback` calls it at the end of fit, and at the
start of a resumed fit so the plots of the earlier segment exist before training goes on.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from captioner.errors import UserError
from captioner.io import atomic_path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
CHANCE_4WAY = 0.25  # HellaSwag has 4 endings
CAPTION_METRICS = (
    "val/cider",
    "val/bleu4",
    "val/meteor",
    "val/rouge_l",
    "val/object_acc",
    "val/pointing_acc",
)


def read_metrics(metrics_csv: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Read Lightning's sparse metrics.csv into {metric: (steps, values)}, keeping only the finite values.

    Each row carries a "step" and some of the metric columns; empty cells mean "not logged in this row".
    """
    metrics_csv = Path(metrics_csv)
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise UserError(f"{metrics_csv}: no 'step' column (header: {reader.fieldnames})")
        series: dict[str, tuple[list[int], list[float]]] = {
            name: ([], []) for name in reader.fieldnames if name not in ("step", "epoch")
        }
        for line, row in enumerate(reader, start=2):
            if not row["step"]:
                continue
            try:
                step = int(float(row["step"]))
            except ValueError:
                raise UserError(f"{metrics_csv}:{line}: step {row['step']!r} is not a number") from None
            for name, (steps, values) in series.items():
                cell = row.get(name)
                if not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise UserError(f"{metrics_csv}:{line}: {name} = {cell!r} is not a number") from None
                if math.isfinite(value):
                    steps.append(step)
                    values.append(value)
    return {name: s for name, s in series.items() if s[0]}


def ema(values: list[float], beta: float) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _save(fig, dest: Path) -> Path:
    # the temp file ends in .tmp, so the format must be named rather than inferred from the suffix
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return dest


def _new_axes(title: str):
    # A bare Figure (no pyplot) renders with Agg: no display, no global figure registry to leak from
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _plot_loss(series, dest: Path) -> Path:
    fig, ax = _new_axes("loss")
    if "train/loss" in series:
        steps, values = series["train/loss"]
        # smooth over ~5% of the logged points so the trend shows through step-to-step noise
        window = min(50, max(1, len(values) // 20))
        ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (raw)")
        ax.plot(steps, ema(values, 1 - 1 / window), color="tab:blue", label=f"train (EMA, {window} pts)")
    if "val/loss" in series:
        steps, values = series["val/loss"]
        ax.plot(steps, values, "o-", color="tab:orange", markersize=4, label="val")
    all_values = [v for name in ("train/loss", "val/loss") if name in series for v in series[name][1]]
    if min(all_values) > 0:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # "4" rather than "4x10^0"

        def minor(v, _):  # every minor tick within a decade; across decades only 2, 3 and 5 (no overlaps)
            low, high = ax.get_ylim()
            leading = round(v / 10 ** math.floor(math.log10(v)))
            return f"{v:g}" if high / low < 10 or leading in (2, 3, 5) else ""

        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    return _save(fig, dest)


def _plot_hellaswag(series, dest: Path) -> Path:
    fig, ax = _new_axes("HellaSwag (val)")
    for name, label in (("val/hellaswag_acc", "acc"), ("val/hellaswag_acc_norm", "acc_norm")):
        if name in series:
            ax.plot(*series[name], "o-", markersize=4, label=label)
    ax.axhline(CHANCE_4WAY, color="grey", linestyle="--", linewidth=1, label="chance (0.25)")
    ax.set_ylabel("accuracy")
    ax.legend()
    return _save(fig, dest)


def _plot_captions(series, dest: Path) -> Path:
    fig, ax = _new_axes("caption metrics (val)")
    for name in CAPTION_METRICS:
        if name in series:
            ax.plot(*series[name], "o-", markersize=4, label=name.removeprefix("val/"))
    if "val/pointing_acc" in series and "val/pointing_chance" in series:  # a uniform peak's score, for scale
        ax.plot(*series["val/pointing_chance"], ":", color="grey", linewidth=1, label="pointing chance")
    if "train/reward" in series:  # self-critical runs: the samples' CIDEr-D, on the scale of val/cider
        ax.plot(
            *series["train/reward"], color="tab:blue", alpha=0.35, linewidth=1, label="train reward (samples)"
        )
    ax.set_ylabel("score (CIDEr-D unscaled, others 0-1)")
    ax.legend()
    return _save(fig, dest)


def _plot_lr(series, dest: Path) -> Path:
    fig, ax = _new_axes("learning rate")
    ax.plot(*series["train/lr"], color="tab:green")
    ax.set_ylabel("lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return _save(fig, dest)


def plot_metrics(metrics_csv: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write loss.png, hellaswag.png, captions.png and lr.png into `out_dir` from a Lightning metrics.csv.

    A plot whose metrics are absent from the file is skipped. Returns the paths written, in that order.
    """
    series = read_metrics(metrics_csv)
    out_dir = Path(out_dir)
    written = []
    if "train/loss" in series or "val/loss" in series:
        written.append(_plot_loss(series, out_dir / "loss.png"))
    if "val/hellaswag_acc" in series or "val/hellaswag_acc_norm" in series:
        written.append(_plot_hellaswag(series, out_dir / "hellaswag.png"))
    if any(name in series for name in CAPTION_METRICS):
        written.append(_plot_captions(series, out_dir / "captions.png"))
    if "train/lr" in series:
        written.append(_plot_lr(series, out_dir / "lr.png"))
    return written


def find_metrics_csv(trainer: pl.Trainer, flush: bool) -> Path | None:
    """metrics.csv of the trainer's CSVLogger (flushed first when `flush`), else <default_root_dir>/metrics.csv."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            if flush:
                logger.save()
            return Path(logger.log_dir) / METRICS_FILE
    fallback = Path(trainer.default_root_dir) / METRICS_FILE
    return fallback if fallback.is_file() else None


class PlotsCallback(pl.Callback):
    """Plot metrics.csv into <default_root_dir>/plots (or `out_dir`) at fit end and when a fit resumes.

    Plotting never stops training: any failure is logged as a warning.
    """

    def __init__(self, out_dir: str | os.PathLike | None = None):
        super().__init__()
        self.out_dir = out_dir

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before Lightning creates the CSV writer of this fit (which empties a non-empty log dir),
        # so a resume in the same run dir still plots what the earlier segment logged. No flush: it would
        # create that writer early.
        if trainer.ckpt_path is not None or trainer.global_step > 0:
            self._plot(trainer, flush=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plot(trainer, flush=True)

    def _plot(self, trainer: pl.Trainer, flush: bool) -> None:
        if not trainer.is_global_zero:
            return
        try:
            metrics_csv = find_metrics_csv(trainer, flush)
            if metrics_csv is None or not metrics_csv.is_file():
                log.warning(
                    "PlotsCallback: no metrics.csv found (is the CSV logger enabled?); no plots written"
                )
                return
            out_dir = (
                Path(self.out_dir) if self.out_dir is not None else Path(trainer.default_root_dir) / "plots"
            )
            written = plot_metrics(metrics_csv, out_dir)
            if written:
                log.info("plots written: %s", ", ".join(str(p) for p in written))
            else:
                log.warning("PlotsCallback: %s holds no plottable metrics yet", metrics_csv)
        except Exception:
            log.warning("PlotsCallback: plotting failed; training is unaffected", exc_info=True)
