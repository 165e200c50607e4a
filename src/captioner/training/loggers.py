"""Loggers that live with a run directory across resumes: a CSV logger that survives resuming into the same run
dir, and a wandb logger that continues one wandb run per run dir.

Lightning's CSVLogger deletes an existing metrics.csv when it starts; a resumed run (`ckpt_path=…` with the same
`hydra.run.dir`) would lose the history its plots need. This one keeps the rows logged before the checkpoint's
step and drops the later ones (they are about to be recomputed), so the file reads as one continuous run.
"""

from __future__ import annotations

import csv
import netrc
import os
import secrets
import warnings
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from captioner.io import atomic_path, save_text


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` that continues an existing metrics.csv instead of deleting it: the rows are read before
    Lightning's writer starts and logged again through it, so old and new rows share one header."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._writer: ExperimentWriter | None = None

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._writer is None:
            _, rows = read_metrics_file(self.metrics_path)
            if rows:
                os.remove(self.metrics_path)  # the writer starts on no file; `rows` are written again below
            with warnings.catch_warnings():
                # it warns that earlier files "will be deleted": not by this logger
                warnings.filterwarnings("ignore", message="Experiment logs directory .* is not empty")
                self._writer = super().experiment
            for row in rows:
                self._writer.log_metrics(row, int(row["step"]))
            self._writer.save()
        return self._writer

    def truncate_from(self, step: int) -> None:
        """Drop rows with step >= `step` (logged after the checkpoint a run resumes from)."""
        fields, rows = read_metrics_file(self.metrics_path)
        if not fields:
            return
        with atomic_path(self.metrics_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["step"]) < step)


def read_metrics_file(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """A metrics.csv's header and rows, as the text it holds (empty cells are ""); nothing if there is none."""
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def truncate_metrics_after(loggers: list, step: int) -> None:
    """A resume from a checkpoint of `step`: drop what each ResumableCSVLogger logged from that step on."""
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.truncate_from(step)


RUN_ID_FILE = "wandb/run_id"


def wandb_run_id(save_dir: str | os.PathLike, resume_from: str | os.PathLike | None = None) -> str:
    """The wandb run id of a run directory, kept in <save_dir>/wandb/run_id so that every resume continues the
    same wandb run: the id of this run dir, else that of the run a resumed checkpoint comes from
    (<run dir>/checkpoints/x.ckpt), else a new one. Written atomically into this run dir."""
    own = Path(save_dir) / RUN_ID_FILE
    candidates = [own]
    if resume_from:
        candidates.append(Path(resume_from).resolve().parent.parent / RUN_ID_FILE)
    run_id = next((p.read_text().strip() for p in candidates if p.is_file()), None) or secrets.token_hex(4)
    if not own.is_file() or own.read_text().strip() != run_id:
        save_text(own, run_id + "\n")
    return run_id


def wandb_logged_in() -> bool:
    """Whether wandb would run online: WANDB_MODE=online, or an API key (WANDB_API_KEY or `wandb login`'s netrc
    entry) with no WANDB_MODE saying otherwise. Read locally: no network."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return False
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return True
    netrc_file = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(netrc_file).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class RunWandbLogger(WandbLogger):
    """`WandbLogger` for a run directory: one wandb run per run dir, resumes included (`wandb_run_id`), online
    when the user is logged in and offline otherwise unless `offline` says which (`logger.wandb.offline=true`)."""

    def __init__(
        self,
        save_dir: str,
        resume_from: str | None = None,
        offline: bool | None = None,
        **kwargs,
    ):
        run_id = wandb_run_id(save_dir, resume_from)
        offline = not wandb_logged_in() if offline is None else offline
        super().__init__(save_dir=save_dir, id=run_id, resume="allow", offline=offline, **kwargs)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if not any(name.startswith("val/") for name in metrics):
            return  # a training step: no summary read on the hot path
        best = best_values(dict(self.experiment.summary), metrics)
        if best:
            self.experiment.summary.update(best)


def best_values(summary: dict, metrics: dict) -> dict:
    """`best/<name>` summary entries that `metrics` improve on: lowest loss, highest of every other val score."""
    out = {}
    for name, value in metrics.items():
        if not name.startswith("val/") or not isinstance(value, (int, float)) or value != value:  # NaN
            continue
        key, lower = f"best/{name}", name.endswith("loss")
        old = summary.get(key)
        if old is None or (value < old if lower else value > old):
            out[key] = value
    return out
