"""A CSV logger that survives resuming into the same run dir.

Lightning's CSVLogger deletes an existing metrics.csv when it starts; a resumed run (`ckpt_path=…` with the same
`hydra.run.dir`) would lose the history its plots need. This one keeps the rows logged before the checkpoint's
step and drops the later ones (they are about to be recomputed), so the file reads as one continuous run.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from captioner.io import atomic_path


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` that appends to an existing metrics.csv instead of deleting it."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def truncate_from(self, step: int) -> None:
        """Drop rows with step >= `step` (logged after the checkpoint a run resumes from)."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], [r for r in reader if int(r["step"]) < step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def truncate_metrics_after(loggers: list, step: int) -> None:
    """A resume from a checkpoint of `step`: drop what each ResumableCSVLogger logged from that step on."""
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.truncate_from(step)
