"""COCO-format caption data: preprocessing, captions, batches, sampling, bad data, resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image

from captioner.data.caption_sampler import CaptionSampler
from captioner.data.captions import CocoCaptionDataModule, encode_caption, normalize_caption
from captioner.data.coco_format import load_captions
from captioner.errors import UserError
from captioner.models.vision import CLIP_MEAN, CLIP_STD, clip_transform, load_image
from captioner.tokenizer import EOT, gpt2_encoding

COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]


def make_caption_root(root: Path, split: str = "train", n_images: int = 6, first_id: int = 1) -> Path:
    """A COCO-format root: `n_images` 40×30 images (PNG and JPEG alternating), 3 distinct captions each."""
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in range(n_images):
        image_id = first_id + k
        name = f"{image_id:012d}." + ("png" if k % 2 else "jpg")
        Image.new("RGB", (40, 30), (30 * k % 256, 80, 255 - 30 * k % 256)).save(root / split / name)
        images.append({"id": image_id, "file_name": name, "width": 40, "height": 30})
        color = COLORS[k % len(COLORS)]
        for j, text in enumerate(
            [
                f"A {color} square.",
                f"the {color} box number {k} sits on a table by the window",
                f"  {k} {color}  THING ",
            ]
        ):
            annotations.append({"id": image_id * 10 + j, "image_id": image_id, "caption": text})
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"captions_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    make_caption_root(tmp_path / "data", "train", 6, first_id=1)
    return make_caption_root(tmp_path / "data", "val", 5, first_id=101)


def make_dm(root, **kwargs) -> CocoCaptionDataModule:
    args = dict(train_split="train", val_split="val", batch_size=4, num_workers=0, image_size=16, seed=7)
    dm = CocoCaptionDataModule(str(root), **{**args, **kwargs})
    dm.setup("fit")
    return dm


# --- preprocessing ------------------------------------------------------------------------------------------


def test_clip_transform_constant_image_gives_clip_normalised_values():
    rgb = (200, 100, 50)
    x = clip_transform(224)(Image.new("RGB", (40, 30), rgb))
    assert type(x) is torch.Tensor and x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = (torch.tensor(rgb) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    assert clip_transform(32)(Image.new("L", (40, 30), 9)).shape == (3, 32, 32)  # grey → RGB


def test_clip_transform_resizes_shortest_side_then_centre_crops():
    # 80×20 image, left half black, right half white → resize to 128×32, centre crop keeps columns 48..80.
    img = Image.new("RGB", (80, 20), (0, 0, 0))
    img.paste((255, 255, 255), (40, 0, 80, 20))
    x = clip_transform(32)(img)
    black = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 16, 2], black, atol=1e-3, rtol=0)
    torch.testing.assert_close(x[:, 16, 29], white, atol=1e-3, rtol=0)


def test_normalize_and_encode_caption():
    enc = gpt2_encoding()
    assert normalize_caption("  A  Dog\truns on  the Beach. . ") == "a dog runs on the beach"
    assert normalize_caption("Two cats...") == "two cats"
    body = enc.encode("a dog runs")
    assert encode_caption(" A dog runs. ", enc, 48) == [EOT, *body, EOT]
    assert encode_caption("A dog runs", enc, len(body) + 1) == [EOT, *body, EOT]  # just fits
    assert encode_caption("A dog runs", enc, len(body)) == [EOT, *body]  # cut: no final EOT
    assert encode_caption("A dog runs", enc, 1) == [EOT, body[0]]


# --- batches ------------------------------------------------------------------------------------------------


def test_batch_shapes_padding_and_label_alignment(root):
    dm = make_dm(root, max_caption_tokens=8, batch_size=18)  # one batch: every caption, some cut at 8 tokens
    enc = gpt2_encoding()
    refs = {
        i: [encode_caption(c, enc, 8) for c in caps] for i, caps in _captions_by_id(root, "train").items()
    }
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"pixel_values", "input_ids", "labels", "n_targets", "image_ids", "skipped"}
    B, T = batch["input_ids"].shape
    assert batch["pixel_values"].shape == (B, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert (
        batch["labels"].shape == (B, T) and batch["labels"].dtype == batch["input_ids"].dtype == torch.int64
    )
    assert batch["image_ids"].shape == (B,) and batch["image_ids"].dtype == torch.int64
    assert B == 18 and batch["skipped"] == []
    lengths = (batch["labels"] != -100).sum(1)
    assert T == lengths.max() == 8 and lengths.min() < T  # padded to the batch's longest caption
    assert batch["n_targets"] == int(lengths.sum())  # a Python int: the step selects targets without a read
    for b in range(B):
        n = int(lengths[b])
        seq = [*batch["input_ids"][b, :n].tolist(), batch["labels"][b, n - 1].item()]
        assert seq in refs[int(batch["image_ids"][b])]  # input_ids = seq[:-1], labels = seq[1:]
        assert batch["labels"][b, : n - 1].tolist() == batch["input_ids"][b, 1:n].tolist()
        assert (batch["labels"][b, n:] == -100).all() and (batch["input_ids"][b, n:] == EOT).all()
    ends = batch["labels"][torch.arange(B), lengths - 1]
    assert (ends == EOT).any() and (ends != EOT).any()  # short captions end with EOT, cut ones do not


def _captions_by_id(root, split) -> dict[int, list[str]]:
    index = load_captions(root, split)
    return {image_id: index.image_captions(i) for i, image_id in enumerate(index.image_ids)}


def test_all_visits_every_pair_one_visits_every_image_once(root):
    index = load_captions(root, "train")
    all_order = CaptionSampler(index, mode="all", seed=3, epoch=0)
    assert sorted(all_order) == list(range(18)) and len(all_order) == 18
    picks = []
    for epoch in range(4):
        order = list(CaptionSampler(index, mode="one", seed=3, epoch=epoch))
        assert sorted(index.caption_image[order].tolist()) == list(range(6))  # each image once
        picks.append(sorted(order))
    assert len({tuple(p) for p in picks}) > 1  # a different caption draw per epoch
    dm_all, dm_one = make_dm(root, captions_per_epoch="all"), make_dm(root, captions_per_epoch="one")
    assert (
        len(dm_all.train_dataloader()) == 5 and len(dm_one.train_dataloader()) == 2
    )  # ceil(18/4), ceil(6/4)
    assert sum(len(b["image_ids"]) for b in dm_one.train_dataloader()) == 6


def test_order_is_seeded_per_epoch(root):
    index = load_captions(root, "train")

    def order(seed, epoch):
        return list(CaptionSampler(index, seed=seed, epoch=epoch))

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    sampler = CaptionSampler(index, seed=1, epoch=0)
    sampler.set_epoch(1)
    assert list(sampler) == order(1, 1)
    dm1, dm2 = make_dm(root), make_dm(root)
    ids1 = [b["image_ids"].tolist() for b in dm1.train_dataloader()]
    assert ids1 == [b["image_ids"].tolist() for b in dm2.train_dataloader()]


def test_ranks_get_disjoint_equal_shares(root):
    index = load_captions(root, "train")  # 18 captions
    for world in (2, 4):
        shares = [list(CaptionSampler(index, seed=5, rank=r, world_size=world)) for r in range(world)]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) == 18 // world
        flat = [c for s in shares for c in s]
        assert len(set(flat)) == len(flat) == 18 // world * world
    val = [
        list(CaptionSampler(index, shuffle=False, rank=r, world_size=4, drop_tail=False)) for r in range(4)
    ]
    assert sorted(c for s in val for c in s) == list(range(18))  # validation counts every pair once

    loaders = []
    for rank in range(2):
        dm = make_dm(root)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        loaders.append(
            (
                [i for b in dm.train_dataloader() for i in b["input_ids"][:, 1].tolist()],
                [i for b in dm.val_dataloader()[0] for i in b["image_ids"].tolist()],
            )
        )
    assert len(loaders[0][0]) == len(loaders[1][0]) == 9
    assert sorted(loaders[0][1] + loaders[1][1]) == sorted(i for i in range(101, 106) for _ in range(3))


# --- bad data -----------------------------------------------------------------------------------------------


def test_corrupt_truncated_and_missing_images_are_skipped_and_named(root):
    val = root / "val"
    (val / "000000000101.jpg").write_bytes(b"this is not an image")
    data = (val / "000000000103.jpg").read_bytes()
    (val / "000000000103.jpg").write_bytes(data[: len(data) // 2])
    (val / "000000000104.png").unlink()
    dm = make_dm(root, batch_size=100)
    (batch,) = list(dm.val_dataloader()[0])
    assert sorted(set(batch["skipped"])) == ["000000000101.jpg", "000000000103.jpg", "000000000104.png"]
    assert len(batch["skipped"]) == 9  # 3 captions each
    assert sorted(set(batch["image_ids"].tolist())) == [102, 105]
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["input_ids"].shape[0] == 6
    assert [it["image_id"] for it in dm.generation_images(10)] == [102, 105]  # all readable ones
    assert [it["image_id"] for it in dm.generation_images(1)] == [
        it["image_id"] for it in make_dm(root, batch_size=100).generation_images(1)
    ]
    (generation,) = list(dm.val_dataloader()[1])  # images to caption, with their references and paths
    assert generation["image_ids"].tolist() == [102, 105] and generation["pixel_values"].shape == (
        2,
        3,
        16,
        16,
    )
    assert generation["references"] == [dm.generation_images(10)[k]["references"] for k in range(2)]
    assert [p.rsplit("/", 1)[1][:12] for p in generation["paths"]] == ["000000000102", "000000000105"]

    collate = dm.val_dataloader()[0].collate_fn  # a batch of nothing but bad images is empty, not an error
    empty = collate([{"skipped": "a.jpg", "image_id": 1}])
    assert empty["pixel_values"].shape == (0, 3, 16, 16) and empty["input_ids"].shape == (0, 0)
    assert empty["skipped"] == ["a.jpg"]


def test_decompression_bomb_is_refused(root, monkeypatch):
    path = root / "train" / "000000000001.jpg"  # 40×30 = 1200 pixels
    assert load_image(path) is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over the limit: PIL would only warn
    assert load_image(path) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: PIL raises
    assert load_image(path) is None
    batch = next(iter(make_dm(root, batch_size=100).val_dataloader()[0]))
    assert len(batch["skipped"]) == 15 and batch["input_ids"].shape[0] == 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "{not json", r"not valid JSON"),
        (lambda d: {"images": d["images"]}, r"'annotations'"),
        (lambda d: d["images"][2].pop("file_name") and d, r"images\[2\]: missing key 'file_name'"),
        (
            lambda d: d["annotations"][4].update(caption=5) or d,
            r"annotations\[4\]: key 'caption' must be str, got 5",
        ),
        (lambda d: d["annotations"][1].update(image_id=999) or d, r"annotations\[1\] has image_id 999"),
        (lambda d: d["images"].append(dict(d["images"][0])) or d, r"repeats image id 101"),
        (lambda d: {"images": [], "annotations": []}, r"split 'val' is empty"),
        (lambda d: {**d, "annotations": []}, r"split 'val' has no captions"),
    ],
)
def test_malformed_annotations_name_file_and_key(root, mutate, message):
    path = root / "annotations" / "captions_val.json"
    data = mutate(json.loads(path.read_text()))
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        make_dm(root)
    assert str(path) in str(err.value)


def test_missing_root_or_annotations_names_path_and_prepare_command(tmp_path, root):
    with pytest.raises(UserError, match=r"nowhere.*captioner-prepare shapes"):
        make_dm(tmp_path / "nowhere", prepare_hint="captioner-prepare shapes")
    (root / "annotations" / "captions_train.json").unlink()
    with pytest.raises(UserError, match=r"captions_train\.json.*captioner-prepare coco"):
        make_dm(root)


# --- resume -------------------------------------------------------------------------------------------------


def test_resume_skips_exactly_the_consumed_batches(root):
    full = [b["image_ids"].tolist() for b in make_dm(root).train_dataloader()]
    dm = make_dm(root)
    dm.load_state_dict({"batches_consumed": 2})
    loader = dm.train_dataloader()
    assert [b["image_ids"].tolist() for b in loader] == full[2:]
    assert len(loader) == len(full)  # Lightning counts the skipped batches itself
    dm = make_dm(root)
    dm.load_state_dict({"batches_consumed": 7, "epoch": 1, "epoch_batches_consumed": 2})
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=1)
    epoch1 = [b["image_ids"].tolist() for b in dm.train_dataloader()]
    fresh = make_dm(root)
    fresh.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=1)
    assert epoch1 == [b["image_ids"].tolist() for b in fresh.train_dataloader()][2:]


class _Recorder(L.LightningModule):
    """Records the batches it trains on; its loss is a trivial function of one parameter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["image_ids"].tolist())
        return (self.w - batch["pixel_values"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, tmp_path, max_steps, ckpt_path=None, num_workers=0):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = _Recorder()
    dm = make_dm(root, num_workers=num_workers)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", callbacks=[ckpt], use_distributed_sampler=False, **quiet
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("step", [2, 5, 7])  # mid-epoch 0, mid-epoch 1 (5 batches per epoch), mid-epoch 1
def test_lightning_resume_continues_with_the_next_batch(root, tmp_path, step):
    full = _fit(root, tmp_path / "a", max_steps=9)
    assert full[:5] != full[5:10]  # a new order in epoch 1
    _fit(root, tmp_path / "b", max_steps=step)
    ckpt = tmp_path / "b" / "ckpt" / f"step={step}.ckpt"
    assert torch.load(ckpt, weights_only=True)["CocoCaptionDataModule"]["batches_consumed"] == step
    resumed = _fit(root, tmp_path / "c", max_steps=9, ckpt_path=ckpt, num_workers=1 if step == 7 else 0)
    assert resumed == full[step:]


# --- prepare: download, verify, extract ---------------------------------------------------------------------
