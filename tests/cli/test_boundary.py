"""The command-line tools' one error boundary: a UserError is one line and exit 2, a bug keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from captioner.cli.boundary import OOM_HINT, error_boundary
from captioner.cli.eval import main as eval_main
from captioner.errors import UserError, check_types
from captioner.training.base import OptimConfig


def test_a_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("CAPTIONER_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit, error_boundary("captioner-x"):
        raise UserError("data.x=3: must be even")
    assert exit.value.code == 2
    assert capsys.readouterr().err == "captioner-x: data.x=3: must be even\n"


def test_captioner_traceback_shows_a_user_errors_traceback(monkeypatch):
    monkeypatch.setenv("CAPTIONER_TRACEBACK", "1")
    with pytest.raises(UserError, match="must be even"), error_boundary("captioner-x"):
        raise UserError("data.x=3: must be even")


@pytest.mark.parametrize("bug", [ValueError("shape mismatch"), KeyError("input_ids"), RuntimeError("CUDA")])
def test_anything_else_is_not_a_user_error(bug, capsys):
    with pytest.raises(type(bug)), error_boundary("captioner-x"):
        raise bug
    assert capsys.readouterr().err == ""  # nothing printed that could pass for the user's mistake


def test_out_of_memory_adds_a_hint_and_keeps_the_error(capsys):
    with pytest.raises(torch.OutOfMemoryError), error_boundary("captioner-x"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
    assert capsys.readouterr().err == f"captioner-x: {OOM_HINT}\n"


def test_an_internal_error_in_a_cli_shows_its_traceback(tmp_path, monkeypatch):
    """A bug deep in captioner-eval (here a ValueError from the scorer) is a traceback, not an exit-2 message."""

    def broken_scorer(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr("captioner.eval.caption_metrics.score_results_file", broken_scorer)
    with pytest.raises(ValueError, match="broadcast"):
        eval_main(["captions", "--pred", "p.json", "--ann", "a.json"])


@pytest.mark.slow
def test_an_internal_error_in_captioner_train_shows_its_traceback(tmp_path):
    code = (
        "import sys, captioner.cli.train as t\n"
        "def train(cfg, callbacks=None): raise KeyError('input_ids')  # a bug in a callback, say\n"
        "t.train = train; sys.argv[0] = 'captioner-train'; t.main()\n"
    )
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code, "experiment=demo_pretrain", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "KeyError: 'input_ids'" in result.stderr


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_steps": "ten"}, "trainer.max_steps='ten': expected int, got str"),
        ({"max_steps": True}, "trainer.max_steps=True: expected int, got bool"),
        ({"gradient_clip_val": "1.0x"}, "trainer.gradient_clip_val='1.0x'"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key(values, message):
    import lightning as L

    with pytest.raises(UserError) as err:
        check_types(L.Trainer, values, "trainer")
    assert str(err.value).startswith(message)


def test_right_types_pass_and_ints_are_floats():
    import lightning as L

    check_types(L.Trainer, {"max_steps": 5, "gradient_clip_val": 1, "precision": "bf16-mixed"}, "trainer")
    assert OptimConfig(lr=1).lr == 1
    with pytest.raises(UserError, match=r"model\.optim\.warmup_steps=2\.5: expected int, got float"):
        OptimConfig(warmup_steps=2.5)
