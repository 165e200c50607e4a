"""`captioner-caption`: files and folders, TSV and JSON lines (with COCO image ids), the API's captions,
unreadable images skipped with a message, user errors → exit code 2 and one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import captioner
from captioner.cli.caption import coco_image_id, main
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


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, ckpt: ["--ckpt", str(tmp / "missing.ckpt"), str(tmp)], "checkpoint not found"),
        (lambda tmp, ckpt: ["--ckpt", str(ckpt), str(tmp / "nowhere.jpg")], "no such image or folder"),
    ],
)
def test_user_errors_exit_2_with_one_line(make_args, message, ckpt, tmp_path, capsys):
    assert exit_code(main, make_args(tmp_path, ckpt)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("captioner-caption: ") and message in err
