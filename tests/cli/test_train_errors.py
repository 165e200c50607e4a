"""What a user sees when a run cannot start or goes wrong: one message naming the key or file, no traceback, a
non-zero exit; and a diverging run that stops with its last good weights intact."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from captioner.cli.train import train
from captioner.training.base import DivergedError
from tests.cli.test_train_e2e import pretrain_overrides, shapes_dir  # noqa: F401 (fixture)
from tests.helpers import compose_run

pytestmark = pytest.mark.slow


def captioner_train(*args: str, cwd) -> subprocess.CompletedProcess:
    code = "import sys; from captioner.cli.train import main; sys.argv[0] = 'captioner-train'; main()"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def assert_clean_error(result, *needles: str, code: int = 2) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_user_errors_are_one_message_without_traceback(tmp_path, shapes_dir):  # noqa: F811
    run = f"hydra.run.dir={tmp_path / 'run'}"
    assert_clean_error(
        captioner_train(cwd=tmp_path), "choose an experiment", "demo_pretrain", "caption_coco2017"
    )
    missing = tmp_path / "nowhere"
    result = captioner_train("experiment=demo_pretrain", f"paths.data_dir={missing}", run, cwd=tmp_path)
    assert_clean_error(result, str(missing / "shapes" / "text"), "captioner-prepare shapes")
    assert not (tmp_path / "run" / "wandb").exists()  # nothing started before the check
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x"}\n')
    args = ["experiment=demo_pretrain", f"paths.data_dir={shapes_dir}", f"model.hellaswag.path={bad}", run]
    assert_clean_error(captioner_train(*args, cwd=tmp_path), "bad.jsonl:1", "'label'")
    args = ["experiment=demo_pretrain", f"paths.data_dir={shapes_dir}", "model.gpt.name=gpt3", run]
    assert_clean_error(captioner_train(*args, cwd=tmp_path), "unknown GPT config name 'gpt3'")
    gone = tmp_path / "old_world" / "vocab_ids.json"  # a world generated before vocab_ids.json existed
    args = ["experiment=demo_pretrain", f"paths.data_dir={shapes_dir}", f"model.gpt.vocab_ids={gone}", run]
    assert_clean_error(captioner_train(*args, cwd=tmp_path), f"{gone}", "captioner-prepare shapes")
    for key, value, expected in [
        ("trainer.max_steps", "ten", "trainer.max_steps='ten': expected int, got str"),
        ("model.optim.lr", "fast", "model.optim.lr='fast': expected float, got str"),
        ("data.micro_batch_size", "eight", "data.micro_batch_size='eight': expected int, got str"),
        ("seed", "1.5", "seed=1.5: expected int, got float"),
    ]:
        args = ["experiment=demo_pretrain", f"paths.data_dir={shapes_dir}", f"{key}={value}", run]
        assert_clean_error(captioner_train(*args, cwd=tmp_path), expected)
    args = ["experiment=demo_caption_scst", f"paths.data_dir={shapes_dir}", run]  # no caption run named
    assert_clean_error(
        captioner_train(*args, cwd=tmp_path), "model.init_ckpt is required: add model.init_ckpt="
    )
    if not torch.cuda.is_available():
        args = ["experiment=demo_pretrain", f"paths.data_dir={shapes_dir}", "trainer=fsdp", run]
        result = captioner_train(*args, cwd=tmp_path)
        assert_clean_error(
            result, "trainer.accelerator=gpu (strategy FSDPStrategy)", "no CUDA GPU", "trainer=cpu"
        )


def test_a_stage1_checkpoint_is_refused_as_caption_resume(tmp_path, shapes_dir):  # noqa: F811
    lm = tmp_path / "lm.ckpt"
    torch.save({"hyper_parameters": {"gpt": {"n_layer": 1}}, "state_dict": {}, "global_step": 3}, lm)
    args = ["experiment=demo_caption", f"paths.data_dir={shapes_dir}", f"ckpt_path={lm}", "logger=none"]
    args += [f"hydra.run.dir={tmp_path / 'run'}"]
    assert_clean_error(captioner_train(*args, cwd=tmp_path), f"ckpt_path={lm} is a stage-1", "model.lm.ckpt=")


def test_a_diverging_run_stops_and_keeps_finite_weights(tmp_path, shapes_dir):  # noqa: F811
    run = tmp_path / "run"
    overrides = pretrain_overrides(shapes_dir, 30, "model.optim.lr=1e4", "model.optim.warmup_steps=1")
    with pytest.raises(
        DivergedError, match=r"not finite for 3 optimizer steps in a row.*Last good checkpoint: .*last"
    ):
        train(compose_run("demo_pretrain", run, *overrides))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert ckpt["global_step"] < 30
