"""Tiny end-to-end runs of captioner-train on generated shapes data: outputs, exact resume, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

import captioner.cli.train as train_cli
from captioner.cli.train import train
from captioner.errors import UserError
from captioner.prepare.shapes import prepare_shapes
from tests.helpers import compose_run, exit_code, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_shapes(
        out, seed=0, train_tokens=60_000, val_tokens=8_000, n_train_images=48, n_val_images=8, n_hellaswag=24
    )
    return out.parent


def pretrain_overrides(data_dir, steps: int, *extra: str) -> list[str]:
    return [
        f"paths.data_dir={data_dir}",
        "model.gpt.name=tiny",
        f"trainer.max_steps={steps}",
        "model.optim.max_steps=8",  # the schedule is fixed independently of where a run stops
        "model.optim.warmup_steps=2",
        "data.seq_len=32",
        "data.micro_batch_size=4",
        "data.total_batch_tokens=256",  # accumulation 2
        "data.val_tokens=1024",
        "model.hellaswag.batch_size=8",
        "callbacks.samples.max_new_tokens=4",
        "val_every_n_steps=2",
        "ckpt_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


FREED_MEMORY_KEPT_BY_TRAIN: list[bool] = []


@pytest.fixture(scope="module")
def pretrain_run(shapes_dir, tmp_path_factory):
    """A 4-step run by train(cfg), as a test or a notebook calls it (FREED_MEMORY_KEPT_BY_TRAIN: whether it
    changed the process's malloc settings)."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_cli, "keep_freed_memory", lambda: FREED_MEMORY_KEPT_BY_TRAIN.append(True))
        train(compose_run("demo_pretrain", run, *pretrain_overrides(shapes_dir, 4)))
    return run


def test_pretrain_fit_writes_checkpoint_metrics_plots(pretrain_run):
    run = pretrain_run
    assert FREED_MEMORY_KEPT_BY_TRAIN == []  # process-wide malloc settings are the CLI's alone
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert "rng_state" in ckpt and any("TokenShardDataModule" in k for k in ckpt)
    metrics = read_metrics(run / "metrics.csv")
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "val/loss",
        "val/hellaswag_acc",
        "val/hellaswag_acc_norm",
        "train/tokens_per_sec",
    ):
        assert key in metrics, key
    assert [s for s, _ in metrics["train/loss"]] == [0, 1, 2, 3]
    # all ranks' tokens: 2 micro-batches of 4 × 32 per optimizer step
    assert [v for _, v in metrics["train/tokens_seen"]] == [256.0, 512.0, 768.0, 1024.0]
    assert [v for _, v in metrics["train/skipped_steps"]] == [0.0] * 4
    assert (run / "plots" / "loss.png").stat().st_size > 0
    assert (run / "plots" / "hellaswag.png").stat().st_size > 0
    assert "## step 2" in (run / "samples.txt").read_text()
    # The Trainer ran with the derived arguments, and the logged config says so.
    logged = yaml.safe_load((run / "hparams.yaml").read_text())
    assert logged["run"]["world_size"] == 1
    trainer_args = logged["config"]["trainer"]
    assert (trainer_args["accumulate_grad_batches"], trainer_args["val_check_interval"]) == (2, 4)


def test_resume_gives_identical_losses(shapes_dir, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train(compose_run("demo_pretrain", full, *pretrain_overrides(shapes_dir, 6)))
    train(compose_run("demo_pretrain", half, *pretrain_overrides(shapes_dir, 3, "ckpt_every_n_steps=3")))
    resumed = tmp_path / "resumed"
    train(
        compose_run(
            "demo_pretrain",
            resumed,
            *pretrain_overrides(shapes_dir, 6, f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}"),
        )
    )
    a = dict(read_metrics(full / "metrics.csv")["train/loss"])
    b = dict(read_metrics(resumed / "metrics.csv")["train/loss"])
    assert sorted(b) == [3, 4, 5]
    for step in (3, 4, 5):
        assert a[step] == pytest.approx(b[step], abs=1e-6), step


@pytest.mark.ddp
def test_two_process_ddp_matches_single_process(shapes_dir, tmp_path):
    """2 gloo ranks × accumulation 1 see the same global batches as 1 rank × accumulation 2: same losses; and
    HellaSwag counts summed over ranks cover every example once."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(compose_run("demo_pretrain", single, *pretrain_overrides(shapes_dir, 3)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "captioner.cli.train",
        "experiment=demo_pretrain",
        f"hydra.run.dir={ddp}",
        "logger=none",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        *pretrain_overrides(shapes_dir, 3),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(single / "metrics.csv"), read_metrics(ddp / "metrics.csv")
    for (s1, v1), (s2, v2) in zip(a["train/loss"], b["train/loss"], strict=True):
        assert s1 == s2 and v1 == pytest.approx(v2, abs=1e-4)
    assert a["val/hellaswag_acc_norm"][-1][1] == pytest.approx(b["val/hellaswag_acc_norm"][-1][1], abs=1e-9)
    assert a["val/loss"][-1][1] == pytest.approx(b["val/loss"][-1][1], abs=1e-3)


def test_accumulation_that_contradicts_the_batch_recipe_is_a_user_error(shapes_dir, tmp_path):
    overrides = pretrain_overrides(shapes_dir, 1, "+trainer.accumulate_grad_batches=3")
    with pytest.raises(UserError, match=r"accumulate_grad_batches=3 contradicts .* gives 2 at world size 1"):
        train(compose_run("demo_pretrain", tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()  # said before the loggers start


def test_keep_freed_memory_sets_glibc_malloc(monkeypatch):
    calls = []
    libc = SimpleNamespace(mallopt=lambda *args: calls.append(args))
    monkeypatch.setattr(train_cli.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(train_cli.platform, "libc_ver", lambda: ("glibc", "2.39"))
    train_cli.keep_freed_memory()
    assert calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB


def test_the_cli_keeps_freed_memory_on_a_cpu_unless_told_not_to(tmp_path, monkeypatch):
    import lightning as L

    kept = []
    monkeypatch.setattr(train_cli, "keep_freed_memory", lambda: kept.append(True))
    (callback,) = train_cli.cli_callbacks(compose_run("demo_pretrain", tmp_path))
    callback.setup(L.Trainer(accelerator="cpu", logger=False), None, "fit")
    assert kept == [True]
    callback.setup(SimpleNamespace(accelerator=object()), None, "fit")  # a GPU run: its host memory as it was
    assert kept == [True]
    assert train_cli.cli_callbacks(compose_run("demo_pretrain", tmp_path, "keep_freed_memory=false")) == []


def caption_overrides(data_dir, steps: int, *extra: str) -> list[str]:
    return [
        f"paths.data_dir={data_dir}",
        f"trainer.max_steps={steps}",
        "model.optim.warmup_steps=1",
        "model.scorers.captions.backend=python",
        "model.generation.max_new_tokens=8",
        "data.batch_size=8",
        "data.val_gen_images=4",
        "val_every_n_steps=2",
        "ckpt_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def standin_clip(shapes_dir):
    """The demo's stand-in CLIP where demo_caption looks for it (paths.data_dir/shapes/clip), tiny."""
    from captioner.shapes.clip import train_shapes_clip

    out = shapes_dir / "shapes" / "clip"
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    train_shapes_clip(shapes_dir / "shapes" / "images", out, clip_config=tiny, steps=2)
    return out


@pytest.fixture(scope="module")
def caption_run(shapes_dir, pretrain_run, standin_clip, tmp_path_factory):
    run = tmp_path_factory.mktemp("caption") / "run"
    lm_ckpt = pretrain_run / "checkpoints" / "last.ckpt"
    train(compose_run("demo_caption", run, *caption_overrides(shapes_dir, 3, f"model.lm.ckpt={lm_ckpt}")))
    return run


def test_caption_fit_writes_checkpoint_metrics_plots_gallery(caption_run, standin_clip):
    run = caption_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and "rng_state" in ckpt
    # CLIP came from the stand-in directory and stayed frozen: its weights are carried over unchanged.
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(standin_clip).state_dict()
    for key in ("embeddings.patch_embedding.weight", "encoder.layers.0.mlp.fc1.weight"):
        assert torch.equal(ckpt["state_dict"][f"model.vision.clip.{key}"], clip[key]), key
    metrics = read_metrics(run / "metrics.csv")
    # (val/pointing_acc needs a caption naming a scene's object: three steps rarely write one)
    for key in ("train/loss", "val/loss", "val/bleu4", "val/rouge_l", "val/cider", "val/object_acc"):
        assert key in metrics, key
    gates = [k for k in metrics if k.startswith("gates/")]  # tanh of every cross-attention layer's two gates
    assert len(gates) == 2 * len(
        {k.split(".")[3] for k in ckpt["state_dict"] if k.startswith("model.lm.cross.")}
    )
    assert (run / "plots" / "loss.png").exists() and (run / "plots" / "captions.png").exists()
    html = (run / "gallery.html").read_text()
    assert html.count("data:image/") >= 4 and "cider" in html.lower()


def test_caption_cli_on_files_and_folder(caption_run, shapes_dir, capsys):
    from captioner.cli.caption import main

    val_dir = shapes_dir / "shapes" / "images" / "val"
    files = sorted(val_dir.iterdir())
    assert (
        main(
            [
                "--ckpt",
                str(caption_run / "checkpoints" / "last.ckpt"),
                "--beams",
                "2",
                "--max-new-tokens",
                "6",
                str(files[0]),
                str(val_dir),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(files)
    assert all(line.split("\t")[0].endswith(".png") for line in lines)
    assert main(["--ckpt", str(caption_run / "checkpoints" / "last.ckpt"), "--json", str(files[0])]) == 0
    import json

    assert json.loads(capsys.readouterr().out.strip())["path"] == str(files[0])
    assert exit_code(main, ["--ckpt", "missing.ckpt", str(files[0])]) == 2


def test_a_built_wheel_trains_from_any_directory(shapes_dir, tmp_path):
    """`pip install .` (not editable) carries configs/ inside the package: captioner-train then runs from a
    directory that has no configs/ and no checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pip = [sys.executable, "-m", "pip", "-q"]
    build = tmp_path / "build"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(build), root], check=True)
    (wheel,) = build.glob("captioner-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    code = (
        "import sys, captioner.cli.train as t; assert t.__file__.startswith(sys.argv.pop(1)); "
        "t.keep_freed_memory = lambda: print('keeping freed memory'); t.main()"
    )
    args = ["experiment=demo_pretrain", f"hydra.run.dir={run}", "logger=none", "validate_at_end=false"]
    args += pretrain_overrides(shapes_dir, 2, "val_every_n_steps=100", "model.hellaswag.path=null")
    env = {**os.environ, "PYTHONPATH": str(site)}
    cmd = [sys.executable, "-c", code, str(site), *args]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, check=True, capture_output=True, text=True)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    terminal = proc.stdout + proc.stderr
    assert "step 2/2 | loss" in terminal and "tok/s" in terminal  # our progress lines
    assert "Tip:" not in terminal  # not Lightning's advertisement
    assert terminal.count("keeping freed memory") == 1  # captioner-train on a CPU, once
    assert terminal.count("GPU available:") == 1  # the Trainer built to read the world size prints nothing
    assert (site / "captioner" / "page.html").is_file()  # the server's page, read at import
