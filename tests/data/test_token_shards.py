"""Token shards: validation, window streams (coverage, ranks, epochs, offsets, workers), resume, val slice; the
streams, resume and val slice on `.npy` and llm.c `.bin` shards alike."""

import itertools
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from captioner.data.shards import list_shards, load_shard, shard_path, write_shard
from captioner.data.token_shards import TokenShardDataModule, TrainWindowStream
from captioner.errors import UserError
from tests.data.test_llmc_shards import write_llmc_shard
from tests.helpers import bare_trainer

T, B = 16, 2
VAL_LEN = 1500
TRAIN_LENS = [16 * 125 + 1, 16 * 190 + 9, 16 * 281 + 1]  # 125 + 190 + 281 = 596 windows
N_WINDOWS = 596


@pytest.fixture(params=["npy", "bin"])
def data_dir(tmp_path, request):
    """Shards whose token at global position p is p, so a window is identified by its first token; every test
    that takes them runs on our `.npy` shards and on llm.c's `.bin` ones."""
    start = 0
    for i, n in enumerate([VAL_LEN, *TRAIN_LENS]):
        path, tokens = (
            shard_path(tmp_path, "tiny", "val" if i == 0 else "train", i),
            np.arange(start, start + n),
        )
        if request.param == "npy":
            write_shard(path, tokens)
        else:
            write_llmc_shard(path.with_suffix(".bin"), tokens)
        start += n
    return tmp_path


def all_train_windows():
    starts = np.cumsum([VAL_LEN, *TRAIN_LENS])
    return {int(s) + T * w for s, n in zip(starts, TRAIN_LENS) for w in range((n - 1) // T)}


def window_ids(batches):
    """First token of every row: one id per window, in stream order."""
    out = []
    for x, y in batches:
        assert x.shape == y.shape == (len(x), T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # y is x shifted by one token
        out += x[:, 0].tolist()
    return out


def stream(data_dir, **kw):
    paths = list_shards(data_dir, "train")
    return TrainWindowStream(paths, [len(load_shard(p)) for p in paths], T, kw.pop("batch_size", B), **kw)


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_write_read_round_trip_and_listing(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 15496, 995])
    write_shard(shard_path(tmp_path, "p", "train", 2), tokens)
    write_shard(shard_path(tmp_path, "p", "train", 1), tokens[:3])
    (tmp_path / "p_manifest.json").write_text("{}")
    (tmp_path / ".p_train_000003.npy.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in list_shards(tmp_path, "train")] == ["p_train_000001.npy", "p_train_000002.npy"]
    shard = load_shard(tmp_path / "p_train_000002.npy")
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint16
    np.testing.assert_array_equal(shard, tokens)
    with pytest.raises(ValueError, match="uint16 range"):
        write_shard(tmp_path / "bad.npy", [70000])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("random", "not a readable .npy"),
        ("truncated", "truncated"),
        ("int32", "dtype is int32"),
        ("2d", "must be 1-D"),
        ("one", "holds 1 token"),
    ],
)
def test_bad_shards_name_the_file(tmp_path, kind, message):
    path = tmp_path / "x_train_000001.npy"
    good = np.arange(100, dtype=np.uint16)
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:-10])
    else:
        np.save(path, {"int32": good.astype(np.int32), "2d": good.reshape(10, 10), "one": good[:1]}[kind])
    with pytest.raises(ValueError, match=message) as err:
        load_shard(path)
    assert str(path) in str(err.value)
    # the DataModule validates every shard at setup
    write_shard(shard_path(tmp_path, "x", "val", 0), good)
    with pytest.raises(ValueError, match=message):
        TokenShardDataModule(str(tmp_path), seq_len=T).setup("fit")


def test_missing_data_names_the_prepare_command(tmp_path):
    hint = "captioner-prepare shapes --out data/shapes"
    with pytest.raises(UserError, match="captioner-prepare shapes --out data/shapes") as err:
        TokenShardDataModule(str(tmp_path / "nowhere"), prepare_hint=hint).setup("fit")
    assert "nowhere" in str(err.value)
    with pytest.raises(UserError, match=r"no train shards .* `captioner-prepare fineweb`"):
        list_shards(tmp_path, "train")


def test_seq_len_longer_than_every_shard(data_dir):
    with pytest.raises(ValueError, match=r"seq_len=5000 needs shards of at least 5001 tokens"):
        TokenShardDataModule(str(data_dir), seq_len=5000).setup("fit")


def test_grad_accum_steps():
    dm = TokenShardDataModule("unused", seq_len=T, micro_batch_size=4, total_batch_tokens=16 * 4 * 8)
    assert dm.grad_accum_steps(1) == 8
    assert dm.grad_accum_steps(2) == 4
    assert dm.grad_accum_steps(8) == 1
    with pytest.raises(
        ValueError, match=r"total_batch_tokens=512 .*micro_batch_size=4 .*seq_len=16 .*world_size=3"
    ):
        dm.grad_accum_steps(3)
    with pytest.raises(ValueError, match="world_size=16"):
        dm.grad_accum_steps(16)


def test_epoch_covers_every_window_once_across_two_ranks(data_dir):
    per_rank = N_WINDOWS // 2 // B
    ranks = [window_ids(take(stream(data_dir, rank=r, world_size=2), per_rank)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == N_WINDOWS // 2
    assert not set(ranks[0]) & set(ranks[1])
    assert set(ranks[0]) | set(ranks[1]) == all_train_windows()
    # the two ranks interleave one global stream: the same one world_size=1 sees
    single = window_ids(take(stream(data_dir), N_WINDOWS // B))
    assert single[0::2] == ranks[0] and single[1::2] == ranks[1]


def test_epochs_reshuffle_deterministically(data_dir):
    per_epoch = N_WINDOWS // B
    ids = window_ids(take(stream(data_dir), 2 * per_epoch))
    epoch0, epoch1 = ids[:N_WINDOWS], ids[N_WINDOWS:]
    assert set(epoch0) == set(epoch1) == all_train_windows()
    assert epoch0 != epoch1
    assert epoch0 != sorted(epoch0)  # shuffled within and across shards
    assert window_ids(take(stream(data_dir), 2 * per_epoch)) == ids  # same seed, same order
    assert window_ids(take(stream(data_dir, seed=7), per_epoch)) != epoch0
    unshuffled = window_ids(take(stream(data_dir, shuffle=False), 2 * per_epoch))
    assert unshuffled[:N_WINDOWS] == unshuffled[N_WINDOWS:] == sorted(all_train_windows())


@pytest.mark.parametrize("k", [0, 5, 297, 298, 1000])  # 298 batches per epoch: straddle the boundary too
def test_start_offset_equals_dropping_batches(data_dir, k):
    full = window_ids(take(stream(data_dir, rank=1, world_size=2), k + 7))
    assert window_ids(take(stream(data_dir, rank=1, world_size=2, start_batch=k), 7)) == full[k * B :]


def test_workers_keep_the_global_order(data_dir):
    def first_batches(num_workers, start):
        dm = TokenShardDataModule(str(data_dir), seq_len=T, micro_batch_size=B, num_workers=num_workers)
        dm.start_batch = start
        return window_ids(take(dm.train_dataloader(), 9))

    assert first_batches(2, 0) == first_batches(0, 0)
    assert (
        first_batches(2, 4) == first_batches(0, 4) == first_batches(0, 0)[2 * 4 :] + first_batches(0, 9)[:8]
    )


def test_state_dict_round_trip(data_dir):
    dm = TokenShardDataModule(str(data_dir), seq_len=T, micro_batch_size=B)
    dm.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, global_rank=0, world_size=1)
    state = dm.state_dict()
    assert state["batches_consumed"] == 6

    resumed = TokenShardDataModule(str(data_dir), seq_len=T, micro_batch_size=B)
    resumed.load_state_dict(state)
    assert resumed.start_batch == 6
    fresh = TokenShardDataModule(str(data_dir), seq_len=T, micro_batch_size=B)
    assert (
        window_ids(take(resumed.train_dataloader(), 3))
        == window_ids(take(fresh.train_dataloader(), 9))[6 * B :]
    )

    # the same tokens consumed on 2 devices with micro-batch 1 resume at the same point of the global stream
    two = TokenShardDataModule(str(data_dir), seq_len=T, micro_batch_size=1)
    two.trainer = SimpleNamespace(global_rank=1, world_size=2)
    two.load_state_dict(state)
    assert two.start_batch == 6
    assert window_ids(take(two.train_dataloader(), 2)) == window_ids(take(fresh.train_dataloader(), 8))[13::2]


def test_val_slice_is_fixed_and_split_across_ranks(data_dir):
    def val_ids(val_tokens, rank=0, world=1):
        dm = TokenShardDataModule(str(data_dir), seq_len=T, micro_batch_size=4, val_tokens=val_tokens)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        loader = dm.val_dataloader()
        return [len(x) for x, _ in loader], window_ids(loader)

    sizes, ids = val_ids(T * 10)
    assert sizes == [4, 4, 2] and ids == [T * w for w in range(10)]
    assert val_ids(T * 10) == (sizes, ids)  # fixed
    (_, r0), (_, r1) = val_ids(T * 11, 0, 2), val_ids(T * 11, 1, 2)
    assert r0 == ids[0::2] and r1 == ids[1::2]  # 11 windows → 5 each, the 11th dropped
    _, everything = val_ids(10**9)
    assert everything == [T * w for w in range((VAL_LEN - 1) // T)]  # capped at the val shard
    with pytest.raises(ValueError, match="val_tokens=8"):
        val_ids(8)


class _Recorder(L.LightningModule):
    """Tiny LM-shaped module that records the first token of every row it trains on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.seen += x[:, 0].tolist()
        return (self.w * x.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_saves_and_restores_the_position(data_dir, tmp_path):
    def fit(max_steps, ckpt_path=None):
        dm = TokenShardDataModule(data_dir, seq_len=T, micro_batch_size=B)
        model = _Recorder()
        trainer = bare_trainer(max_steps=max_steps, accumulate_grad_batches=2)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, dm, model.seen

    trainer, _, first = fit(3)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert ckpt["TokenShardDataModule"]["batches_consumed"] == 6
    assert ckpt["datamodule_hyper_parameters"]["data_dir"] == str(data_dir)
    _, dm, rest = fit(5, tmp_path / "mid.ckpt")
    assert dm.start_batch == 6
    _, _, straight = fit(5)
    assert first + rest == straight and len(straight) == 5 * 2 * B
