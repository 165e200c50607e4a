"""ModelCheckpoint that writes atomically and always leaves `last.ckpt` at the final step."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class AtomicModelCheckpoint(ModelCheckpoint):
    """A crash mid-save never leaves a torn checkpoint: write `<name>.tmp`, then rename over `<name>`.
    Lightning's own callback also skips `last.ckpt` when the run ends between two save intervals; this one saves
    it, so `ckpt_path=…/last.ckpt` always resumes from where the run stopped."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("atomic_checkpoint")
        self._last_checkpoint_saved = filepath

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
