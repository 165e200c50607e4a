"""Lightning internals we use where Lightning has no public API, one test each: an upgrade that drops or changes
one fails here, naming the file of ours that depends on it, instead of at the end of a long run. pyproject pins
lightning to the minor these tests pass on; an upgrade moves the pin once they pass on the new one."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from captioner.training.callbacks.checkpoint import FinalStepCheckpoint
from tests.training.test_callbacks import TinyLM


def gone(ours: str, theirs: str) -> str:
    return (
        f"{ours} relies on Lightning's private {theirs}, which lightning {pl.__version__} does not have (or "
        "has changed): rewrite that code for this version, then move pyproject's lightning pin"
    )


def fit(tmp_path, max_steps: int, callbacks=()) -> pl.Trainer:
    tokens = torch.randint(0, 16, (8, 6), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(TinyLM(), DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2))
    return trainer


@pytest.mark.parametrize("name", ["_save_last_checkpoint", "_monitor_candidates"])
def test_model_checkpoint_methods(name):
    assert callable(getattr(ModelCheckpoint, name, None)), gone(
        "training/callbacks/checkpoint.py", f"ModelCheckpoint.{name}"
    )


def test_model_checkpoint_records_the_step_it_last_saved(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=2)
    fit(tmp_path, max_steps=3, callbacks=[callback])
    # Lightning's own end-of-training save skips a callback that saved before: the last save was at step 2.
    assert getattr(callback, "_last_global_step_saved", None) == 2, gone(
        "training/callbacks/checkpoint.py", "ModelCheckpoint._last_global_step_saved"
    )


def test_final_step_checkpoint_leaves_last_ckpt_at_the_final_step(tmp_path):
    callback = FinalStepCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=2)
    fit(tmp_path, max_steps=3, callbacks=[callback])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]  # refreshed, not versioned


class BatchCounts(pl.Callback):
    """What data/captions.py's state_dict reads, at each point a checkpoint may be taken (after a batch)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, *args):
        try:
            ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        except AttributeError as err:
            pytest.fail(f"{gone('data/captions.py', 'fit_loop.epoch_loop.batch_progress.current')}: {err}")
        self.seen.append((trainer.current_epoch, ready))


def test_batch_progress_counts_the_batches_of_the_epoch(tmp_path):
    counts = BatchCounts()
    fit(tmp_path, max_steps=6, callbacks=[counts])  # 4 batches per epoch: 2 into the second epoch
    assert counts.seen == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)], gone(
        "data/captions.py (state_dict's epoch_batches_consumed)", "batch_progress.current.ready"
    )
