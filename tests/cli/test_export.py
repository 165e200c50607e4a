"""`captioner-export`: both checkpoint kinds, one-line errors with exit status 2, --force, offline --push-to-hub."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.cli.export import main
from captioner.models.captioner import CONFIG_FILE, WEIGHTS_FILE, load_captioner
from captioner.models.gpt import GPT, GPTConfig
from tests.helpers import exit_code
from tests.models.test_export import save_lightning_checkpoint, tiny_caption_checkpoint


@pytest.fixture
def caption_ckpt(tmp_path) -> Path:
    tiny_caption_checkpoint(tmp_path / "caption.ckpt")
    return tmp_path / "caption.ckpt"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("captioner-export: "), err
    return err[0]


def test_stage1_checkpoint_becomes_a_transformers_model(tmp_path, capsys):
    model = GPT(GPTConfig.named("tiny"))
    save_lightning_checkpoint(tmp_path / "last.ckpt", {"gpt": dataclasses.asdict(model.config)}, model)
    assert main(["--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "transformers GPT2LMHeadModel" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json"} <= names


def test_caption_checkpoint_becomes_a_captioner_directory(caption_ckpt, tmp_path, capsys):
    out = tmp_path / "nested" / "export"  # parents are created
    assert main(["--ckpt", str(caption_ckpt), "--out", str(out)]) == 0
    assert "captioner directory" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    model, hparams = load_captioner(out)
    assert len(model.lm.cross) == 2 and hparams["generation"]["num_beams"] == 2


def test_bad_inputs_exit_2_with_one_line(caption_ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert exit_code(main, ["--ckpt", str(tmp_path / "missing.ckpt"), "--out", out]) == 2
    assert "checkpoint not found" in one_error_line(capsys)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert exit_code(main, ["--ckpt", str(tmp_path / "notes.txt"), "--out", out]) == 2
    assert "not a checkpoint we can read" in one_error_line(capsys)
    torch.save({"hyper_parameters": {"lr": 0.1}, "state_dict": {}}, tmp_path / "other.ckpt")
    assert exit_code(main, ["--ckpt", str(tmp_path / "other.ckpt"), "--out", out]) == 2
    assert "neither a stage-1 nor a caption checkpoint" in one_error_line(capsys)
    assert exit_code(main, ["--ckpt", str(caption_ckpt), "--out", str(tmp_path / "notes.txt")]) == 2
    assert "is not a directory" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_kept_unless_forced(caption_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert exit_code(main, ["--ckpt", str(caption_ckpt), "--out", str(out)]) == 2
    assert "not empty; pass --force" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert main(["--ckpt", str(caption_ckpt), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])


def test_push_to_hub_offline_fails_in_one_line_and_keeps_the_export(
    caption_ckpt, tmp_path, capsys, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # whatever the environment says: never the network
    out = tmp_path / "out"
    assert (
        main(["--ckpt", str(caption_ckpt), "--out", str(out), "--push-to-hub", "someone/tiny-captioner"]) == 1
    )
    line = one_error_line(capsys)
    assert "upload to someone/tiny-captioner failed" in line and "offline" in line.lower()
    assert (out / WEIGHTS_FILE).is_file()


def test_console_script_prints_no_traceback(tmp_path):
    script = Path(sys.executable).parent / "captioner-export"
    if not script.exists():
        pytest.skip("package not installed in this environment (pip install -e .)")
    run = subprocess.run(
        [str(script), "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"captioner-export: checkpoint not found: {tmp_path / 'missing.ckpt'}"
    ]
