"""Callbacks: metric plots, caption gallery, throughput/MFU (one tiny CPU fit)."""

import csv
import html
import logging
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from captioner.training.callbacks.gallery import CaptionGalleryCallback, write_gallery
from captioner.training.callbacks.plots import PlotsCallback, plot_metrics, read_metrics
from captioner.training.callbacks.throughput import (
    ThroughputCallback,
    batch_tokens,
    default_peak_flops,
    matmul_precision,
    peak_flops_for,
)
from captioner.training.caption import CaptionModule
from captioner.training.pretrain import PretrainModule
from tests.helpers import TINY_CLIP


def write_metrics_csv(path, columns, rows):
    """Write a sparse Lightning-style metrics.csv: `rows` are dicts, missing keys become empty cells."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", *columns])
        writer.writeheader()
        writer.writerows(rows)
    return path


def assert_png(path):
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 100 and img.size[1] > 100


# ---------------------------------------------------------------- plots


def full_metrics_rows():
    rows = []
    for step in range(40):
        rows.append({"epoch": 0, "step": step, "train/loss": 10.0 * 0.95**step, "train/lr": 1e-4 * step / 40})
        if step % 10 == 9:
            rows.append(
                {
                    "epoch": 0,
                    "step": step,
                    "val/loss": 9.0 * 0.95**step,
                    "val/hellaswag_acc": 0.25 + step / 400,
                    "val/hellaswag_acc_norm": 0.26 + step / 400,
                    "val/cider": step / 40,
                    "val/bleu4": step / 100,
                    "val/object_acc": step / 40,
                    "val/pointing_acc": step / 50,
                    "val/pointing_chance": 0.11,
                }
            )
    return rows


def test_plot_metrics_writes_every_plot(tmp_path):
    columns = ["train/loss", "train/lr", "val/loss", "val/hellaswag_acc", "val/hellaswag_acc_norm"]
    columns += ["val/cider", "val/bleu4", "val/object_acc", "val/pointing_acc", "val/pointing_chance"]
    metrics = write_metrics_csv(tmp_path / "metrics.csv", columns, full_metrics_rows())
    written = plot_metrics(metrics, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "hellaswag.png", "captions.png", "lr.png"]
    for p in written:
        assert_png(p)
    # atomic writes leave no temp files behind
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)


def test_plot_metrics_skips_missing_columns(tmp_path):
    rows = [{"epoch": 0, "step": s, "train/loss": 5.0 - s / 10} for s in range(10)]
    rows.append({"epoch": 0, "step": 9, "val/loss": 4.5})
    metrics = write_metrics_csv(tmp_path / "metrics.csv", ["train/loss", "val/loss"], rows)
    written = plot_metrics(metrics, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png"]
    assert_png(written[0])
    assert not (tmp_path / "plots" / "hellaswag.png").exists()


def test_read_metrics_is_sparse_and_names_bad_cells(tmp_path):
    rows = [
        {"epoch": 0, "step": 0, "train/loss": 3.0},
        {"epoch": 0, "step": 1, "train/loss": "nan"},
        {"epoch": 0, "step": 1, "val/loss": 2.5},
    ]
    metrics = write_metrics_csv(tmp_path / "metrics.csv", ["train/loss", "val/loss", "val/cider"], rows)
    series = read_metrics(metrics)
    assert series == {
        "train/loss": ([0], [3.0]),
        "val/loss": ([1], [2.5]),
    }  # nan dropped, empty column absent

    write_metrics_csv(tmp_path / "bad.csv", ["train/loss"], [{"epoch": 0, "step": 0, "train/loss": "oops"}])
    with pytest.raises(ValueError, match=r"bad\.csv:2: train/loss = 'oops'"):
        read_metrics(tmp_path / "bad.csv")
    (tmp_path / "nostep.csv").write_text("epoch,train/loss\n0,1.0\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        read_metrics(tmp_path / "nostep.csv")


# ---------------------------------------------------------------- gallery


def test_write_gallery_escapes_text_embeds_images_and_survives_bad_paths(tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (640, 480), (30, 30, 200)).save(tmp_path / "blue.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    items = [
        {
            "image_id": 1,
            "path": tmp_path / "red.png",
            "caption": "a <b>red</b> square & a circle",
            "references": ["a red square", "<script>alert(1)</script>"],
            "scores": {"bleu4": 0.41234, "cider": 1.5, "meteor": None},
        },
        {"image_id": 2, "path": tmp_path / "blue.jpg", "caption": "blue", "references": [], "scores": {}},
        {
            "image_id": 3,
            "path": tmp_path / "broken.jpg",
            "caption": "broken",
            "references": ["x"],
            "scores": {},
        },
        {
            "image_id": 4,
            "path": tmp_path / "missing.png",
            "caption": "missing",
            "references": [],
            "scores": {},
        },
    ]
    out = write_gallery(items, tmp_path / "gallery.html", summary={"cider": 0.9, "n": 4})
    text = out.read_text()

    assert html.escape("a <b>red</b> square & a circle") in text
    assert "<b>red</b>" not in text and "<script>" not in text
    assert text.count("data:image/png;base64,") == 1  # PNG stays lossless
    assert text.count("data:image/jpeg;base64,") == 1
    assert text.count("image unavailable") == 2
    assert "0.412" in text and "1.500" in text and "Overall scores" in text and "0.900" in text

    # the embedded JPEG was shrunk to fit 224 px
    import base64
    import io

    b64 = text.split("data:image/jpeg;base64,")[1].split('"')[0]
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        assert max(img.size) == 224


def test_write_gallery_names_missing_keys(tmp_path):
    with pytest.raises(KeyError, match=r"gallery item 0 lacks \['path'\]"):
        write_gallery([{"image_id": 1, "caption": "x"}], tmp_path / "g.html")


# ---------------------------------------------------------------- throughput + plots in a fit


def test_batch_tokens_and_peak_table():
    x = torch.zeros(4, 8, dtype=torch.long)
    assert batch_tokens(x) == batch_tokens((x, x)) == batch_tokens({"input_ids": x, "pixels": x}) == 32
    with pytest.raises(KeyError, match="input_ids"):
        batch_tokens({"ids": x})
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("NVIDIA L4") == 121e12
    assert peak_flops_for("NVIDIA L40S") is None  # "L4" must not match a different card
    assert peak_flops_for("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops_for("NVIDIA H200", "tf32") == 495e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12


def test_peak_follows_the_precision_in_use():
    """An fp32 run is measured against the TF32 peak (or the FP32 one when matmuls stay full fp32), not bf16's."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert matmul_precision("32-true") == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision("32-true") == "fp32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert matmul_precision("bf16-mixed") == matmul_precision("16-mixed") == "bf16"
    assert matmul_precision("64-true") is None
    for name, *_ in [("NVIDIA H100 80GB HBM3",), ("NVIDIA A100-SXM4-80GB",), ("NVIDIA L4",)]:
        bf16, tf32, fp32 = (peak_flops_for(name, p) for p in ("bf16", "tf32", "fp32"))
        assert bf16 > tf32 > fp32
    assert default_peak_flops(torch.device("cpu"), "bf16-mixed") is None  # no MFU on a CPU


def tiny_caption_batches(B=3, T=7):
    ids = torch.randint(0, 1000, (B, T))
    labels = ids.clone()
    labels[0, 5:] = -100  # padding: no target there
    features = {"input_ids": ids, "labels": labels, "features": torch.randn(B, 17, TINY_CLIP["hidden_size"])}
    pixels = {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(B, 3, 64, 64)}
    return features, pixels


def test_caption_flops_count_clip_only_when_it_runs_on_pixels():
    module = CaptionModule(
        lm={"config": "tiny"}, vision={"clip": None, "clip_config": TINY_CLIP}, cross_every=1
    )
    features, pixels = tiny_caption_batches()
    clip = module.model.vision.clip
    n_clip = sum(p.numel() for p in module.model.vision.clip_parameters())
    B, N, D, layers = 3, 17, TINY_CLIP["hidden_size"], TINY_CLIP["num_hidden_layers"]
    # frozen CLIP, forward only: 2 FLOPs per parameter per image token, plus its attention
    clip_flops = B * N * (2 * n_clip + 4 * layers * N * D)
    assert not any(p.requires_grad for p in clip.parameters())
    assert float(module.flops_per_batch(pixels)) - float(module.flops_per_batch(features)) == clip_flops
    # the frozen LM is not counted as trained: its tied output layer does 4 FLOPs per parameter and target
    lm_head = module.model.lm.lm_head.weight.numel()
    targets = int((features["labels"] != -100).sum())
    assert module._flops_terms["head"] == 4 * lm_head
    assert float(module.flops_per_batch(features)) < 6 * lm_head * targets


def test_flops_are_counted_before_a_strategy_shards_the_model():
    """FSDP leaves each rank a flat shard of every parameter: MFU must still count the whole model."""
    caption = CaptionModule(
        lm={"config": "tiny"}, vision={"clip": None, "clip_config": TINY_CLIP}, cross_every=1
    )
    features, pixels = tiny_caption_batches()
    ids = torch.randint(0, 50257, (2, 16))
    for module, batch in [(PretrainModule(gpt="tiny"), (ids, ids)), (caption, features), (caption, pixels)]:
        before = float(module.flops_per_batch(batch))
        with torch.no_grad():
            for p in module.parameters():  # the shard of rank 0 of 2
                p.data = p.data.flatten()[: max(1, p.numel() // 2)]
        assert float(module.flops_per_batch(batch)) == before


@pytest.mark.parametrize("trainable", [["xattn", "projection"], ["xattn"], ["xattn", "projection", "lm"]])
def test_caption_flops_match_a_flop_counter(trainable):
    """The analytic count agrees with torch's FLOP counter (Lightning's measure_flops) on a real step, forward and
    backward, within the biases and norms the counter leaves out (a few % at width 32; 0.1 % at GPT-2 124M +
    ViT-B/32). The output layer, which dominates at vocab 50,304, is taken off both sides so that the rest is
    compared too (an error in the head would show up there in full)."""
    module = CaptionModule(
        lm={"config": "tiny"},
        vision={"clip": None, "clip_config": TINY_CLIP},
        cross_every=1,
        trainable=trainable,
    )
    module.train()
    for batch in tiny_caption_batches():
        with sdpa_kernel(SDPBackend.MATH):  # CPU attention kernels are invisible to the counter; MATH is not
            measured = measure_flops(module, lambda b=batch: module._loss(b), lambda loss: loss)
        head = module._flops_terms["head"] * int((batch["labels"] != -100).sum())
        assert float(module.flops_per_batch(batch)) - head == pytest.approx(measured - head, rel=0.06)


class TinyLM(pl.LightningModule):
    """Embedding + 2 Linear layers on (B, T) token ids; next-token loss."""

    def __init__(self, vocab=16, width=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, vocab)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T), (B, T)
        logits = self.net(self.emb(x))  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_throughput_and_plots_in_a_tiny_fit(tmp_path, caplog):
    B, T = 2, 5
    tokens = torch.randint(0, 16, (16, T + 1))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=B)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=4,
        accumulate_grad_batches=2,
        logger=CSVLogger(save_dir=tmp_path, name="", version=""),
        callbacks=[ThroughputCallback(), PlotsCallback()],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with caplog.at_level(logging.WARNING, logger="captioner.callbacks"):
        trainer.fit(TinyLM(), loader)

    series = read_metrics(tmp_path / "metrics.csv")
    _, rates = series["train/tokens_per_sec"]
    assert len(rates) == 3  # 4 optimizer steps, the first one not measured
    assert all(r > 0 for r in rates)
    assert "train/mfu" not in series  # no peak FLOPs on a CPU
    assert_png(tmp_path / "plots" / "loss.png")
    assert_png(tmp_path / "plots" / "lr.png")


def test_mfu_logged_when_peak_and_flops_are_known(tmp_path):
    B, T = 2, 5
    tokens = torch.randint(0, 16, (8, T + 1))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=B)
    model = TinyLM()
    n_params = sum(p.numel() for p in model.parameters())
    model.flops_per_batch = lambda batch: (
        6 * n_params * (batch[0] >= 0).sum()
    )  # a tensor, summed on the device
    run_dir = tmp_path / "run"
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        max_steps=3,
        logger=CSVLogger(save_dir=run_dir, name="", version=""),
        callbacks=[ThroughputCallback(peak_flops=1e12)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, loader)
    series = read_metrics(run_dir / "metrics.csv")
    (_, rates), (_, mfus) = series["train/tokens_per_sec"], series["train/mfu"]
    assert mfus == pytest.approx([r * 6 * n_params / 1e12 for r in rates])


class RecordingWandb(WandbLogger):
    """A WandbLogger that records its tables instead of starting a run."""

    def __init__(self):
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


def test_gallery_and_wandb_table_show_the_same_validation_items(tmp_path, caplog):
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "green.png")
    wandb_logger = RecordingWandb()
    trainer = SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        default_root_dir=str(tmp_path / "run"),
        loggers=[wandb_logger],
        global_step=7,
    )
    module = SimpleNamespace(val_predictions=[], val_scores={})
    callback = CaptionGalleryCallback(max_items=2)
    with caplog.at_level(logging.WARNING):
        callback.on_validation_end(trainer, module)  # nothing generated yet: a warning, no file, no crash
    assert "no val_predictions" in caplog.text and not (tmp_path / "run" / "gallery.html").exists()

    module.val_predictions = [
        {
            "image_id": i,
            "path": str(tmp_path / "green.png"),
            "caption": f"caption {i}",
            "references": ["ref a", "ref b"],
            "scores": {"cider": i / 10, "object_acc": 1.0},
        }
        for i in range(3)
    ]
    module.val_scores = {"step": 7, "cider": 0.5}
    callback.on_validation_end(trainer, module)
    gallery = (tmp_path / "run" / "gallery.html").read_text()
    assert "caption 1" in gallery and "caption 2" not in gallery  # max_items
    assert "Overall scores" in gallery and "0.500" in gallery
    ((key, columns, rows, step),) = wandb_logger.tables
    assert key == "val/samples" and step == 7
    assert columns == ["image", "caption", "references", "cider", "object_acc"]
    assert [row[1:] for row in rows] == [
        ["caption 0", "ref a | ref b", 0.0, 1.0],
        ["caption 1", "ref a | ref b", 0.1, 1.0],
    ]


def test_plots_callback_plots_at_resume_start_only(tmp_path):
    """At fit start the callback plots only a resumed run; it reads the CSV logger's file without flushing."""
    rows = [{"epoch": 0, "step": s, "train/loss": 3.0 - s / 10} for s in range(5)]
    write_metrics_csv(tmp_path / "metrics.csv", ["train/loss"], rows)
    logger = CSVLogger(save_dir=tmp_path, name="", version="")
    trainer = SimpleNamespace(
        loggers=[logger], ckpt_path=None, global_step=0, is_global_zero=True, default_root_dir=str(tmp_path)
    )
    callback = PlotsCallback()
    callback.on_fit_start(trainer, None)
    assert not (tmp_path / "plots").exists()
    trainer.ckpt_path = str(tmp_path / "last.ckpt")
    callback.on_fit_start(trainer, None)
    assert_png(tmp_path / "plots" / "loss.png")
    assert (tmp_path / "metrics.csv").is_file()  # the logger's writer (which empties its dir) was not created
