"""Karpathy's COCO splits become ordinary caption splits of a COCO 2017 root."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from captioner.data.coco_format import load_captions
from captioner.errors import UserError
from captioner.prepare.karpathy import prepare_karpathy


def coco_root(tmp_path, train_ids, val_ids):
    root = tmp_path / "coco"
    for folder, ids in (("train2017", train_ids), ("val2017", val_ids)):
        (root / folder).mkdir(parents=True)
        for i in ids:
            Image.new("RGB", (8, 8), (i % 255, 0, 0)).save(root / folder / f"{i:012d}.jpg")
    return root


def split_file(tmp_path, images, dataset="coco"):
    path = tmp_path / "dataset_coco.json"
    records = [
        {
            "cocoid": i,
            "split": split,
            "filename": f"COCO_val2014_{i:012d}.jpg",
            "sentences": [
                {"raw": f"A picture {i}.", "sentid": 10 * i},
                {"raw": f"Image {i}", "sentid": 10 * i + 1},
            ],
        }
        for i, split in images
    ]
    path.write_text(json.dumps({"dataset": dataset, "images": records}))
    return path


def test_splits_are_caption_splits_of_the_root(tmp_path):
    root = coco_root(tmp_path, train_ids=[1, 2, 3, 4], val_ids=[5, 6])
    path = split_file(tmp_path, [(1, "train"), (2, "restval"), (5, "val"), (3, "test"), (6, "test")])
    assert prepare_karpathy(root, path) == {"train": 2, "val": 1, "test": 2}
    test = load_captions(root, "karpathy_test")
    assert test.image_ids == [3, 6]
    assert test.image_captions(1) == ["A picture 6.", "Image 6"]
    with Image.open(test.image_path(1)) as image:  # a symlink into val2017/
        assert image.getpixel((0, 0))[0] in range(4, 9)
    assert (root / "karpathy_test" / "000000000006.jpg").readlink().parts[-2] == "val2017"
    train = load_captions(root, "karpathy_train")
    assert train.image_ids == [1, 2]  # restval is part of Karpathy's train
    ann = json.loads((root / "annotations" / "captions_karpathy_train.json").read_text())
    assert sorted(a["id"] for a in ann["annotations"]) == [10, 11, 20, 21]
    (root / "annotations" / "captions_karpathy_val.json").write_text(
        "{broken"
    )  # a re-run keeps finished splits
    with pytest.raises(UserError, match=r"captions_karpathy_val\.json: not valid JSON"):
        prepare_karpathy(root, path)


@pytest.mark.parametrize(
    "images, dataset, message",
    [
        ([(1, "train"), (1, "val"), (9, "test")], "coco", "image 9 .* neither .*train2017/ nor .*val2017/"),
        ([(1, "train"), (1, "val")], "coco", "no test images"),
        ([(1, "dev")], "coco", r"images\[0\]: split 'dev' is none of"),
        ([(1, "test")], "flickr8k", "'flickr8k', not COCO"),
    ],
)
def test_bad_split_files_are_one_line_errors(tmp_path, images, dataset, message):
    root = coco_root(tmp_path, train_ids=[1], val_ids=[])
    with pytest.raises(UserError, match=message):
        prepare_karpathy(root, split_file(tmp_path, images, dataset))
    assert not (root / "annotations").exists()  # nothing written


def test_needs_a_prepared_coco_root(tmp_path):
    with pytest.raises(UserError, match="no train2017 or val2017/; run `captioner-prepare coco`"):
        prepare_karpathy(tmp_path, tmp_path / "dataset_coco.json")


def test_captioner_prepare_coco_karpathy(tmp_path, capsys):
    from captioner.cli.prepare import main

    root = coco_root(tmp_path, train_ids=[1, 2], val_ids=[3])
    (root / "annotations").mkdir()
    for split, ids in (("train2017", [1, 2]), ("val2017", [3])):
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
        captions = [{"id": i, "image_id": i, "caption": f"image {i}"} for i in ids]
        (root / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"images": images, "annotations": captions})
        )
    path = split_file(tmp_path, [(1, "train"), (2, "val"), (3, "test")])
    assert main(["coco", "--root", str(root), "--source", str(root), "--karpathy", str(path)]) == 0
    assert "karpathy_test 1 images" in capsys.readouterr().out
    assert load_captions(root, "karpathy_val").image_ids == [2]
