"""The shapes world's stand-in CLIP: labels, training, the saved directory the captioner loads, the CLI."""

import json
from pathlib import Path

import pytest

from captioner.cli.prepare import main as prepare_main
from captioner.errors import UserError
from captioner.models.vision import VisionEncoder
from captioner.prepare.shapes import prepare_shapes
from captioner.shapes import world as S
from captioner.shapes.clip import REPORT, cell_labels, load_split, train_shapes_clip
from tests.helpers import exit_code

TINY_STANDIN = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "world"
    prepare_shapes(
        out, seed=0, train_tokens=4_000, val_tokens=2_000, n_train_images=24, n_val_images=6, n_hellaswag=5
    )
    return out / "images"


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "clip"
    train_shapes_clip(images, out, clip_config=TINY_STANDIN, steps=80, lr=3e-3, warmup_steps=5)
    return out


def test_cell_labels_name_each_cell_or_empty():
    scene = S.Scene(
        [S.Obj("blue", "star", "large", 0, 2, 0.83, 0.17), S.Obj("red", "circle", "small", 2, 0, 0.17, 0.83)]
    )
    labels = cell_labels(scene)
    assert labels.shape == (9, 3)
    empty = [len(S.COLORS), len(S.SHAPES), len(S.SIZES)]
    assert labels[2].tolist() == [S.COLORS.index("blue"), S.SHAPES.index("star"), S.SIZES.index("large")]
    assert labels[6].tolist() == [S.COLORS.index("red"), S.SHAPES.index("circle"), S.SIZES.index("small")]
    assert all(labels[i].tolist() == empty for i in (0, 1, 3, 4, 5, 7, 8))


def test_load_split_skips_and_counts_unreadable_images(images, tmp_path, caplog):
    import shutil

    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    bad = sorted((copy / "val").iterdir())[1]
    bad.write_bytes(b"not a png")
    pixels, labels = load_split(copy, "val", 48)
    assert pixels.shape == (5, 3, 48, 48) and labels.shape == (5, 9, 3)
    assert "skipped 1 unreadable" in caplog.text and bad.name in caplog.text


def test_training_learns_and_saves_a_clip_the_captioner_loads(trained, images):
    report = json.loads((trained / REPORT).read_text())
    assert report["train_images"] == 24 and report["val_images"] == 6
    assert report["final_loss"] < 0.5 * report["first_loss"]  # it learns the cells of the training images
    encoder = VisionEncoder(16, clip=str(trained))  # the path stage 2 takes: model.vision.clip=<dir>
    assert encoder.image_size == 48 and encoder.num_tokens == 10 and encoder.hidden_size == 32
    pixels, _ = load_split(images, "val", 48)
    assert encoder(pixel_values=pixels[:2]).shape == (2, 10, 16)


def test_a_finished_directory_is_not_retrained(trained, images):
    before = (trained / "model.safetensors").stat().st_mtime_ns
    report = train_shapes_clip(images, trained, clip_config=TINY_STANDIN, steps=5)
    assert report["steps"] == 80 and (trained / "model.safetensors").stat().st_mtime_ns == before


def test_bad_settings_are_clear_errors(images, tmp_path):
    with pytest.raises(ValueError, match=r"image_size \(64\) must be 3 x patch_size \(16\)"):
        train_shapes_clip(images, tmp_path / "a", clip_config={**TINY_STANDIN, "image_size": 64}, steps=1)
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"holds no shapes_clip\.json"):
        train_shapes_clip(images, tmp_path / "b", steps=1)
    assert not (tmp_path / "a").exists()


def test_cli(images, tmp_path, capsys):
    out = tmp_path / "clip"
    args = ["shapes-clip", "--images", str(images), "--out", str(out), "--steps", "2"]
    assert prepare_main(args) == 0
    assert "val cell accuracy" in capsys.readouterr().out and (out / "config.json").exists()
    args = ["shapes-clip", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]
    assert exit_code(prepare_main, args) == 2
    assert "nowhere" in capsys.readouterr().err
