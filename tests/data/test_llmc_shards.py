"""llm.c's `.bin` token shards: layout, refusals naming the file, listing beside `.npy`, and the same training
(losses step for step, mid-epoch resume) from the same tokens in either format."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from captioner.data.shards import list_shards, load_shard, shard_path, write_shard
from captioner.data.token_shards import TokenShardDataModule
from captioner.errors import UserError
from captioner.training.pretrain import PretrainModule
from tests.helpers import bare_trainer


def write_llmc_shard(path, tokens, *, magic=20240520, version=1, count=None) -> Path:
    """A shard as llm.c's dev/data/data_common.py lays it out (our own writer): 256 int32 of header (magic,
    version, token count, zeros) then the tokens as uint16."""
    tokens = np.asarray(tokens, dtype=np.uint16)
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    Path(path).write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    return Path(path)


def test_reads_the_tokens_in_place(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 15496, 995])
    path = write_llmc_shard(tmp_path / "edu_fineweb_train_000001.bin", tokens)
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    shard = load_shard(path)
    # a read-only map past the 1,024-byte header: the tokens are never read into memory as a whole
    assert isinstance(shard, np.memmap) and shard.offset == 1024 and shard.mode == "r"
    assert shard.dtype == np.uint16 and shard.shape == (6,)
    np.testing.assert_array_equal(shard, tokens)


def test_format_is_recognised_by_content(tmp_path):
    tokens = np.arange(10)
    llmc_named_npy = write_llmc_shard(tmp_path / "a_train_000001.npy", tokens)
    write_shard(tmp_path / "b_train_000001.bin", tokens)  # ours, with llm.c's suffix
    for path in (llmc_named_npy, tmp_path / "b_train_000001.bin"):
        np.testing.assert_array_equal(load_shard(path), tokens)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (dict(magic=20240326), "magic 20240326, expected 20240520"),  # an llm.c model file
        (dict(magic=20240801), r"magic 20240801, expected 20240520 .*Llama 3 .*uint32"),
        (dict(version=2), "version 2, expected 1"),
        (dict(count=101), r"truncated: header says 101 tokens \(1226 bytes\), file is 1224 bytes"),
        (dict(count=99), r"has trailing bytes: header says 99 tokens \(1222 bytes\), file is 1224 bytes"),
        (dict(count=1), "header says 1 token"),
        (dict(count=-5), "header says -5 token"),
    ],
)
def test_bad_headers_are_one_line_naming_the_file(tmp_path, edit, message):
    path = write_llmc_shard(tmp_path / "x_train_000001.bin", np.arange(100), **edit)
    with pytest.raises(UserError, match=message) as err:
        load_shard(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # the DataModule checks every shard at setup
    write_llmc_shard(tmp_path / "x_val_000000.bin", np.arange(100))
    with pytest.raises(UserError, match=message):
        TokenShardDataModule(str(tmp_path), seq_len=8).setup("fit")


def test_shorter_than_the_header(tmp_path):
    path = tmp_path / "x_train_000001.bin"
    path.write_bytes(np.array([20240520, 1, 3], dtype="<i4").tobytes())
    with pytest.raises(UserError, match=r"x_train_000001.bin: 12 bytes, shorter than the 1024-byte header"):
        load_shard(path)


def test_listing_beside_npy_and_mixed_splits_refused(tmp_path):
    # what llm.c's fineweb.py names its shards, beside other llm.c files that are not token shards
    for name in (
        "edu_fineweb_val_000000.bin",
        "edu_fineweb_train_000002.bin",
        "edu_fineweb_train_000001.bin",
    ):
        write_llmc_shard(tmp_path / name, np.arange(40))
    for name in ("gpt2_124M.bin", "hellaswag_val.bin", "tiny_shakespeare_train.bin"):
        (tmp_path / name).write_bytes(b"\0" * 2048)
    assert [p.name for p in list_shards(tmp_path, "train")] == [
        "edu_fineweb_train_000001.bin",
        "edu_fineweb_train_000002.bin",
    ]
    write_shard(shard_path(tmp_path, "edu_fineweb", "val", 0), np.arange(40))
    with pytest.raises(UserError, match="val shards in two formats") as err:
        TokenShardDataModule(str(tmp_path), seq_len=8).setup("validate")
    message = str(err.value)
    assert str(tmp_path) in message and "\n" not in message
    assert "1 .npy (edu_fineweb_val_000000.npy" in message and "1 .bin (edu_fineweb_val_000000.bin" in message
    # one format per split is enough: llm.c's train shards with our val shard
    (tmp_path / "edu_fineweb_val_000000.bin").unlink()
    TokenShardDataModule(str(tmp_path), seq_len=8).setup("fit")


T, B, ACCUM = 16, 2, 2
LENGTHS = [T * 8 + 1, T * 40 + 5, T * 30 + 1]  # val, then 70 train windows: 4 steps × 4 windows is mid-epoch


@pytest.fixture(scope="module")
def same_tokens(tmp_path_factory):
    """One token stream written as our `.npy` shards and as llm.c `.bin` shards, each in its own directory."""
    tokens = np.random.default_rng(0).integers(0, 50257, sum(LENGTHS))
    dirs = {fmt: tmp_path_factory.mktemp(fmt) for fmt in ("npy", "bin")}
    for index, piece in enumerate(np.split(tokens, np.cumsum(LENGTHS)[:-1])):
        path = shard_path(dirs["npy"], "edu_fineweb", "val" if index == 0 else "train", index)
        write_shard(path, piece)
        write_llmc_shard(dirs["bin"] / path.with_suffix(".bin").name, piece)
    return dirs


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _fit(data_dir, max_steps, ckpt_path=None, save=None):
    """A tiny GPT trained on data_dir's shards: micro-batch losses, val loss."""
    L.seed_everything(0)
    model = PretrainModule(gpt="tiny", optim={"warmup_steps": 1, "max_steps": 4})
    losses = _Losses()
    trainer = bare_trainer(max_steps=max_steps, accumulate_grad_batches=ACCUM, callbacks=[losses])
    dm = TokenShardDataModule(str(data_dir), seq_len=T, micro_batch_size=B, total_batch_tokens=T * B * ACCUM)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    (val,) = L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1
    ).validate(model, datamodule=dm, verbose=False)
    return losses.losses, val["val/loss"]


def test_npy_and_bin_train_alike_and_resume_mid_epoch(same_tokens, tmp_path):
    npy_losses, npy_val = _fit(same_tokens["npy"], 4)
    bin_losses, bin_val = _fit(same_tokens["bin"], 4)
    assert len(npy_losses) == 4 * ACCUM and len(set(npy_losses)) == len(npy_losses)
    assert bin_losses == npy_losses and bin_val == npy_val  # exactly: the same batches in the same order

    first, _ = _fit(same_tokens["bin"], 2, save=tmp_path / "mid.ckpt")
    assert (
        torch.load(tmp_path / "mid.ckpt", weights_only=True)["TokenShardDataModule"]["batches_consumed"] == 4
    )
    rest, resumed_val = _fit(same_tokens["bin"], 4, ckpt_path=tmp_path / "mid.ckpt")
    assert first + rest == bin_losses and resumed_val == bin_val
