"""Numbered snapshots kept for good, and validation of the untrained model at step 0 (as build-nanogpt runs)."""

from __future__ import annotations

import pytest
import torch

from captioner.cli.train import train
from captioner.errors import UserError
from captioner.training.callbacks.checkpoint import NumberedSnapshots
from tests.cli.test_train_e2e import pretrain_overrides, shapes_dir  # noqa: F401 (fixture)
from tests.helpers import compose_run, read_metrics

pytestmark = pytest.mark.slow


def test_snapshots_every_n_steps_and_validation_at_step_0(tmp_path, shapes_dir):  # noqa: F811
    run = tmp_path / "run"
    extra = (
        "ckpt_keep_every_n_steps=2",
        "validate_at_start=true",
        "val_every_n_steps=3",
    )  # the last one wins
    train(compose_run("demo_pretrain", run, *pretrain_overrides(shapes_dir, 5, *extra)))
    snapshots = sorted(p.name for p in (run / "checkpoints").glob("step*.ckpt"))
    assert snapshots == ["step000002.ckpt", "step000004.ckpt"]
    for name, step in (("step000002.ckpt", 2), ("step000004.ckpt", 4)):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        assert ckpt["global_step"] == step and "optimizer_states" in ckpt  # whole checkpoints: they resume
    metrics = read_metrics(run / "metrics.csv")
    # the untrained model, after 3 steps (Lightning logs it at 2: its logging step counts the steps before the
    # one that triggered validation), and the end
    assert [s for s, _ in metrics["val/loss"]] == [0, 2, 5]
    assert next(s for s, _ in metrics["val/hellaswag_acc_norm"]) == 0

    resumed = tmp_path / "resumed"  # a snapshot resumes like last.ckpt; no validation at start then
    ckpt = run / "checkpoints" / "step000004.ckpt"
    train(
        compose_run("demo_pretrain", resumed, *pretrain_overrides(shapes_dir, 5, *extra, f"ckpt_path={ckpt}"))
    )
    assert [s for s, _ in read_metrics(resumed / "metrics.csv")["val/loss"]] == [5]


def test_bad_interval_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="ckpt_keep_every_n_steps must be a positive"):
        NumberedSnapshots(str(tmp_path), every_n_steps=0)
