"""`captioner-eval`: captions, hellaswag and coco subcommands end to end, and user errors → exit code 2."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from captioner.cli.eval import main
from captioner.eval.caption_metrics import METRICS
from captioner.eval.hellaswag import evaluate_hellaswag
from captioner.models.gpt import GPT, GPTConfig
from tests.eval.test_caption_metrics import write_coco
from tests.eval.test_coco_split import make_world, write_caption_checkpoint
from tests.eval.test_hellaswag import EXAMPLES, write_jsonl
from tests.helpers import exit_code


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
    assert exit_code(main, argv) == 2
    captured = capsys.readouterr()
    assert "missing.file" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


@pytest.fixture(scope="module")
def shapes_coco(tmp_path_factory):
    """(a tiny shapes world's COCO-layout root, a caption checkpoint), never written to."""
    out = tmp_path_factory.mktemp("shapes")
    make_world(out)
    write_caption_checkpoint(out / "caption.ckpt", {"method": "beam", "num_beams": 3, "max_new_tokens": 6})
    return out / "images", out / "caption.ckpt"


def test_coco_end_to_end_then_captions_scores_its_file(tmp_path, shapes_coco, capsys, monkeypatch):
    world, ckpt = shapes_coco
    root = shutil.copytree(world, tmp_path / "coco")
    monkeypatch.setenv("CAPTIONER_DATA_DIR", str(tmp_path))  # the default root is $CAPTIONER_DATA_DIR/coco
    argv = ["coco", "--ckpt", str(ckpt), "--split", "val", "--beams", "1", "--num-workers", "0"]
    assert main([*argv, "--batch-size", "4", "--backend", "python"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert tuple(result)[: len(METRICS)] == METRICS
    assert (result["n"], result["skipped"]) == (6, 0) and result["images_per_sec"] > 0
    (pred,) = (root / "results").glob("val_caption_*.json")  # named after the checkpoint and its weights
    assert str(pred) in captured.err and "images/s" in captured.err

    ann = root / "annotations" / "captions_val.json"
    assert main(["captions", "--pred", str(pred), "--ann", str(ann), "--backend", "python"]) == 0
    assert last_json(capsys) == {key: result[key] for key in METRICS}


@pytest.mark.parametrize("problem", ["root", "annotations", "ckpt", "stage1-ckpt", "device"])
def test_coco_user_errors_exit_2_without_traceback(tmp_path, shapes_coco, tiny_ckpt, capsys, problem):
    world, ckpt = shapes_coco
    root = world
    if problem == "root":
        root = tmp_path / "no-root"
    elif problem == "annotations":
        root = tmp_path / "empty"
        root.mkdir()
    elif problem == "ckpt":
        ckpt = tmp_path / "missing.ckpt"
    elif problem == "stage1-ckpt":
        ckpt = tiny_ckpt[0]
    device = "cuda" if problem == "device" else "cpu"
    if problem == "device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "results.json"
    argv = ["coco", "--ckpt", str(ckpt), "--root", str(root), "--split", "val", "--out", str(out)]
    assert exit_code(main, [*argv, "--device", device, "--backend", "python"]) == 2
    captured = capsys.readouterr()
    expected = {
        "root": "no-root",
        "annotations": "captions_val.json",
        "ckpt": "missing.ckpt",
        "stage1-ckpt": "caption checkpoint",
        "device": "CUDA is not available",
    }[problem]
    assert expected in captured.err and "Traceback" not in captured.err
    assert captured.out == "" and not out.exists()


def test_bad_arguments_exit_2(capsys):
    for argv in (
        ["hellaswag"],
        ["hellaswag", "--ckpt", "a", "--hf", "b"],
        ["hellaswag", "--hf", "x", "--limit", "0"],
        ["coco"],
        ["coco", "--ckpt", "c", "--beams", "0"],
        ["coco", "--ckpt", "c", "--batch-size", "0"],
        ["coco", "--ckpt", "c", "--num-workers", "-1"],
        ["coco", "--ckpt", "c", "--backend", "java"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


def test_default_paths_follow_captioner_data_dir(tmp_path, monkeypatch):
    from captioner.cli.prepare import build_parser

    monkeypatch.setenv("CAPTIONER_DATA_DIR", str(tmp_path / "elsewhere"))
    args = build_parser().parse_args(["coco"])
    assert str(args.root) == str(tmp_path / "elsewhere" / "coco")
    args = build_parser().parse_args(["shapes-clip"])
    assert str(args.images) == str(tmp_path / "elsewhere" / "shapes" / "images")
