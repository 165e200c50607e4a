"""`captioner-eval`: captions and hellaswag subcommands end to end, and user errors → exit code 2."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from captioner.cli.eval import main
from captioner.eval.caption_metrics import METRICS
from captioner.eval.hellaswag import evaluate_hellaswag
from captioner.models.gpt import GPT, GPTConfig
from tests.eval.test_caption_metrics import write_coco
from tests.eval.test_hellaswag import EXAMPLES, write_jsonl


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_captions_end_to_end(tmp_path, capsys):
    pred, ann = write_coco(tmp_path)
    assert main(["captions", "--pred", str(pred), "--ann", str(ann), "--backend", "python"]) == 0
    result = last_json(capsys)
    assert tuple(result) == METRICS
    assert result["meteor"] is None and 0 < result["bleu1"] <= 1 and result["cider"] > 0


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A stage-1 Lightning checkpoint as the pretraining module saves it: plain-data hparams, `model.` keys."""
    model = GPT(GPTConfig.named("tiny"))
    ckpt = {
        "hyper_parameters": {"model": dataclasses.asdict(model.config)},
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    return path, model


def test_hellaswag_from_checkpoint(tmp_path, tiny_ckpt, capsys):
    ckpt, model = tiny_ckpt
    data = tmp_path / "hs.jsonl"
    write_jsonl(data, EXAMPLES)
    argv = ["hellaswag", "--ckpt", str(ckpt), "--data", str(data), "--limit", "5", "--batch-size", "2"]
    assert main([*argv, "--device", "cpu"]) == 0
    result = last_json(capsys)
    assert result == evaluate_hellaswag(model, data, limit=5)  # the checkpoint's weights were the ones scored
    assert result["n"] == 5 and set(result) == {"n", "acc", "acc_norm"}


def test_hellaswag_from_hf_directory(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_dir = tmp_path / "hf_gpt2"
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(hf_dir)
    data = tmp_path / "hs.jsonl"
    write_jsonl(data, EXAMPLES[:3])
    assert main(["hellaswag", "--hf", str(hf_dir), "--data", str(data), "--device", "cpu"]) == 0
    assert last_json(capsys)["n"] == 3


@pytest.mark.parametrize("command", ["hellaswag-ckpt", "hellaswag-data", "captions"])
def test_missing_files_exit_2_without_traceback(tmp_path, tiny_ckpt, capsys, command):
    data = tmp_path / "hs.jsonl"
    write_jsonl(data, EXAMPLES)
    missing = str(tmp_path / "missing.file")
    argv = {
        "hellaswag-ckpt": ["hellaswag", "--ckpt", missing, "--data", str(data), "--device", "cpu"],
        "hellaswag-data": ["hellaswag", "--ckpt", str(tiny_ckpt[0]), "--data", missing, "--device", "cpu"],
        "captions": ["captions", "--pred", missing, "--ann", missing, "--backend", "python"],
    }[command]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "missing.file" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_bad_arguments_exit_2(capsys):
    for argv in (
        ["hellaswag"],
        ["hellaswag", "--ckpt", "a", "--hf", "b"],
        ["hellaswag", "--hf", "x", "--limit", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
