"""`captioner-caption`: files and folders, TSV and JSON lines (with COCO image ids), the API's captions,
unreadable images skipped with a message, attention maps as one PNG per image and in the JSON lines, user
errors → exit code 2 and one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import captioner
from captioner.cli.caption import coco_image_id, main, png_paths
from captioner.models.attention_maps import AttentionMaps, attention_strip
from captioner.models.vision import open_image
from tests.helpers import exit_code
from tests.test_api import image_bytes, noise_image, write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("model") / "last.ckpt")


@pytest.fixture
def folder(tmp_path):
    """Three COCO-named images, one other, a text file the folder scan ignores."""
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, name in enumerate(
        ["000000000139.jpg", "000000000285.png", "COCO_val2014_000000000042.png", "cat.png"]
    ):
        (folder / name).write_bytes(
            image_bytes(noise_image(seed), "JPEG" if name.endswith(".jpg") else "PNG")
        )
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_tsv_lines_for_files_and_folders_match_the_api(ckpt, folder, tmp_path, capsys):
    extra = tmp_path / "extra.png"
    extra.write_bytes(image_bytes(noise_image(9)))
    assert main(["--ckpt", str(ckpt), str(folder), str(extra), "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    paths = [*sorted(p for p in folder.iterdir() if p.suffix != ".txt"), extra]
    expected = captioner.load(ckpt, device="cpu").caption(paths)
    assert lines == [f"{p}\t{' '.join(c.split())}" for p, c in zip(paths, expected, strict=True)]


def test_json_lines_carry_coco_image_ids_and_the_beams(ckpt, folder, capsys):
    assert main(["--ckpt", str(ckpt), str(folder), "--json", "--beams", "2", "--max-new-tokens", "4"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = {r["path"].rsplit("/", 1)[1]: r.get("image_id") for r in records}
    assert ids == {
        "000000000139.jpg": 139,
        "000000000285.png": 285,
        "COCO_val2014_000000000042.png": 42,
        "cat.png": None,
    }
    pipeline = captioner.load(ckpt, device="cpu")
    assert [r["caption"] for r in records] == pipeline.caption(
        [r["path"] for r in records], beams=2, max_new_tokens=4
    )
    results = [{"image_id": r["image_id"], "caption": r["caption"]} for r in records if "image_id" in r]
    assert len(results) == 3  # ready for `captioner-eval captions --pred`


def test_coco_image_ids_come_only_from_coco_names():
    names = {"000000000139.jpg": 139, "7.png": 7, "COCO_train2014_000000000009.jpg": 9, "img_3.jpg": None}
    assert {name: coco_image_id(Path(name)) for name in names} == names


def test_an_unreadable_image_is_skipped_with_a_message(ckpt, folder, capsys):
    (folder / "broken.png").write_bytes(image_bytes(noise_image(5))[:300])
    (folder / "empty.jpg").write_bytes(b"")
    assert main(["--ckpt", str(ckpt), str(folder), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4
    assert "broken.png" not in captured.out and "empty.jpg" not in captured.out
    skipped = captured.err.splitlines()
    assert any("skipping" in line and "broken.png: corrupt or truncated" in line for line in skipped)
    assert any("skipping" in line and "empty.jpg" in line for line in skipped)


def test_attention_writes_a_png_per_readable_image_and_the_json_carries_the_maps(
    ckpt, folder, tmp_path, capsys
):
    (folder / "broken.png").write_bytes(image_bytes(noise_image(5))[:300])
    other = tmp_path / "other"
    other.mkdir()
    (other / "cat.jpg").write_bytes(image_bytes(noise_image(7), "JPEG"))  # the same stem as folder/cat.png
    out = tmp_path / "maps" / "new"  # made as needed
    assert (
        main(["--ckpt", str(ckpt), str(folder), str(other / "cat.jpg"), "--json", "--attention", str(out)])
        == 0
    )
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "broken.png" in captured.err
    records = [json.loads(line) for line in captured.out.splitlines()]
    names = ["000000000139", "000000000285", "COCO_val2014_000000000042", "cat", "cat-2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in names)  # nothing half-written
    assert [r["attention_png"] for r in records] == [str(out / f"{n}.png") for n in names]
    expected = captioner.load(ckpt, device="cpu").caption([r["path"] for r in records], attention=True)
    for record, want in zip(records, expected, strict=True):
        assert record["caption"] == want["caption"] and record["tokens"] == want["tokens"]
        assert np.allclose(record["attention"], want["attention"], atol=1e-6)
        assert np.allclose(record["cls"], want["cls"], atol=1e-6)
        maps = AttentionMaps(record["tokens"], np.array(record["attention"]), np.array(record["cls"]))
        strip = attention_strip(open_image(record["path"]), maps)  # the image, then a tile per token
        png = np.asarray(Image.open(record["attention_png"]))
        assert png.shape == (96 + 16, 100 * (1 + len(record["tokens"])), 3)
        assert np.abs(png.astype(int) - np.asarray(strip)).max() <= 1


def test_maps_puts_the_maps_in_the_json_without_pngs(ckpt, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--ckpt", str(ckpt), str(folder / "cat.png"), "--json", "--maps"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert set(record) == {"path", "caption", "tokens", "attention", "cls"}
    assert np.array(record["attention"]).shape == (len(record["tokens"]), 4, 4)
    assert list(tmp_path.iterdir()) == [folder]
    assert main(["--ckpt", str(ckpt), str(folder / "cat.png"), "--attention", str(tmp_path / "png")]) == 0
    assert capsys.readouterr().out.count("\t") == 1  # TSV as before; the maps went to the PNG
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["cat.png"]


def test_png_names_are_unique_whatever_the_stems():
    paths = [Path("a/cat.jpg"), Path("b/cat.png"), Path("cat-2.png"), Path("c/cat.gif")]
    assert [p.name for p in png_paths(paths, Path("out"))] == [
        "cat.png",
        "cat-2.png",
        "cat-2-2.png",
        "cat-3.png",
    ]


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, ckpt: ["--ckpt", str(tmp / "missing.ckpt"), str(tmp)], "checkpoint not found"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), str(tmp / "nowhere.jpg")], "no such image or folder"),
        (
            lambda tmp, ckpt: ["--ckpt", str(ckpt), str(tmp), "--attention", str(ckpt)],
            "cannot make the folder",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(make_args, message, ckpt, tmp_path, capsys):
    assert exit_code(main, make_args(tmp_path, ckpt)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("captioner-caption: ") and message in err


def test_maps_without_json_is_a_usage_error(ckpt, tmp_path, capsys):
    assert exit_code(main, ["--ckpt", str(ckpt), str(tmp_path), "--maps"]) == 2
    assert "--maps puts the maps in the JSON lines: add --json" in capsys.readouterr().err
