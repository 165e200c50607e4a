"""ModelCheckpoint that always leaves `last.ckpt` at the final step.

Lightning 2.6 already writes checkpoints atomically (`_atomic_save`: serialise to memory, then an fsspec
transaction that moves the finished file into place), so only the end of a run needs our help.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from captioner.errors import UserError


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


class NumberedSnapshots(Callback):
    """`dirpath/stepNNNNNN.ckpt` every `every_n_steps` optimizer steps, never replaced or removed (None: off), so a
    late divergence or a bad stretch of data never leaves a long run without its mid-run models. Each is a whole
    checkpoint: it resumes like last.ckpt."""

    def __init__(self, dirpath: str, every_n_steps: int | None = None):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise UserError(
                f"ckpt_keep_every_n_steps must be a positive number of steps or null, got {every_n_steps!r}"
            )
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self._saved_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._saved_step and step > 0:
            self._saved_step = step  # the optimizer step's last micro-batch: saved once, not per micro-batch
            trainer.save_checkpoint(self.dirpath / f"step{step:06d}.ckpt")
