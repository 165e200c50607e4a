"""ModelCheckpoint that always leaves `last.ckpt` at the final step.

Lightning 2.6 already writes checkpoints atomically (`_atomic_save`: serialise to memory, then an fsspec
transaction that moves the finished file into place), so only the end of a run needs our help.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning's callback saves `last.ckpt` at the end of training only if it never saved one, so a run that ends
    between two save intervals leaves a stale last.ckpt; this one refreshes it, so `ckpt_path=…/last.ckpt` always
    resumes from where the run stopped.

    Lightning has no public API for "the step this callback last saved" or "save last.ckpt now" (its versioned
    name, the link mode, the removal of the previous file): the three private members below are pinned by
    tests/training/test_lightning_private.py and pyproject's lightning range."""

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
