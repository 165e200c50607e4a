"""StepProgress: optimizer steps against max_steps with metrics and ETA, as plain lines or a rich bar."""

import logging
import re
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from captioner.training.callbacks.progress import StepProgress, format_duration, read_scalars
from captioner.training.callbacks.throughput import ThroughputCallback
from tests.training.test_callbacks import TinyLM


class TinyLMWithVal(TinyLM):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(self.emb(x)).flatten(0, 1), y.flatten())
        self.log("val/loss", loss)


def fit(tmp_path, progress, max_steps=4, ckpt_path=None, **trainer_kwargs):
    tokens = torch.randint(0, 16, (64, 6), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accumulate_grad_batches=2,
        callbacks=[ThroughputCallback(), progress],  # throughput first, as in configs/callbacks/default.yaml
        logger=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **trainer_kwargs,
    )
    model = TinyLMWithVal()
    trainer.fit(model, DataLoader(data, batch_size=2), DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def test_plain_lines_carry_step_total_loss_and_tokens_per_sec(tmp_path, capsys):
    fit(tmp_path, StepProgress(every_n_steps=2, mode="lines"), val_check_interval=4)  # validate every 2 steps
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step")]
    assert steps[0] == "step 0/4 | starting training"
    step2 = next(line for line in steps if line.startswith("step 2/4 | loss"))
    assert re.fullmatch(
        r"step 2/4 \| loss \d+\.\d{4} \| lr 1\.0e-01 \| dt \d+ms \| tok/s [\d,]+ \| eta .+", step2
    )
    last = next(line for line in steps if line.startswith("step 4/4 | loss"))
    assert "tok/s" in last and "eta" not in last  # nothing left to wait for
    # validation is a phase of its own: announced, then timed with its metrics
    assert "step 2/4 | validating…" in steps
    assert any(
        re.fullmatch(r"step 2/4 \| validation \d+\.\ds \| val/loss \d+\.\d{4}", line) for line in steps
    )


def test_resumed_fit_counts_from_the_resumed_step(tmp_path, capsys):
    first = fit(tmp_path, StepProgress(mode="lines"), max_steps=2)
    first.save_checkpoint(tmp_path / "step2.ckpt")
    capsys.readouterr()
    fit(tmp_path, StepProgress(every_n_steps=1, mode="lines"), max_steps=4, ckpt_path=tmp_path / "step2.ckpt")
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert steps[0] == "step 2/4 | resuming training"
    assert [line.split(" | ")[0] for line in steps[1:]] == ["step 3/4", "step 4/4"]


def test_bar_mode_draws_steps_and_leaves_log_handlers_as_they_were(tmp_path, capsys):
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger("captioner.test_progress").addHandler(handler)
    try:
        fit(tmp_path, StepProgress(mode="bar"))
        out = capsys.readouterr().out
        assert re.search(r"train .* 4/4 .*loss \d+\.\d{4}", out)
        assert handler.stream is sys.stdout  # pointed at rich on a terminal, and back when the bar stops
    finally:
        logging.getLogger("captioner.test_progress").removeHandler(handler)


def test_other_ranks_stay_silent(capsys):
    progress = StepProgress(mode="lines")
    trainer = SimpleNamespace(is_global_zero=False, global_step=10, sanity_checking=False)
    progress.on_train_start(trainer, None)
    progress.on_train_batch_end(trainer, None, None, None, 0)
    progress.on_validation_start(trainer, None)
    assert capsys.readouterr().out == ""


def test_helpers():
    assert [format_duration(s) for s in (0.42, 12.4, 185, 7620)] == ["0.4s", "12s", "3m05s", "2h07m"]
    metrics = {"train/loss": torch.tensor(2.5), "train/lr": 1e-3, "val/loss": torch.tensor(3.0)}
    assert read_scalars(metrics, ["train/loss", "train/lr", "train/mfu"]) == {
        "train/loss": 2.5,
        "train/lr": pytest.approx(1e-3),
    }
    with pytest.raises(ValueError, match="mode"):
        StepProgress(mode="tqdm")
