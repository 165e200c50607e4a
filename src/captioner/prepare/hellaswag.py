"""`captioner-prepare hellaswag`: the HellaSwag jsonl from rowanz/hellaswag, as build-nanogpt downloads it."""

from __future__ import annotations

from pathlib import Path

from captioner.data.hellaswag import load_examples
from captioner.errors import UserError
from captioner.prepare.download import download

BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
SPLITS = ("train", "val")  # hellaswag_test.jsonl has no labels: its answers are scored by the leaderboard


def default_url(split: str) -> str:
    return f"{BASE_URL}/hellaswag_{split}.jsonl"


def download_hellaswag(out_dir: str | Path, split: str = "val", *, url: str | None = None) -> Path:
    """Download `hellaswag_{split}.jsonl` (from `url`, default rowanz/hellaswag on GitHub) into `out_dir`,
    check that it parses, and return its path; a valid file already there is kept. The transfer resumes and
    lands atomically (see `download`); a file that does not parse is deleted, so a re-run fetches it again."""
    if split == "test":
        raise UserError("HellaSwag's test split has no labels, so it cannot be scored here; use val or train")
    if split not in SPLITS:
        raise UserError(f"unknown HellaSwag split {split!r}; expected one of {SPLITS}")
    url = url or default_url(split)
    dest = download(url, Path(out_dir) / f"hellaswag_{split}.jsonl")
    try:
        load_examples(dest, limit=1)
    except UserError as err:
        dest.unlink()
        raise UserError(f"{err} (downloaded from {url}); deleted it, re-run to download it again") from err
    return dest
