"""`captioner-prepare hellaswag`: the HellaSwag jsonl from rowanz/hellaswag, as build-nanogpt downloads it."""

from __future__ import annotations

from pathlib import Path

from captioner.data.hellaswag import load_examples
from captioner.errors import UserError
from captioner.prepare.download import download

BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
SPLITS = ("train", "val", "test")


def download_hellaswag(out_dir: str | Path, split: str = "val", *, base_url: str = BASE_URL) -> Path:
    """Download `hellaswag_{split}.jsonl` into `out_dir`, check that it parses, and return its path; a file
    already there is kept. The transfer resumes and lands atomically (see `download`)."""
    if split not in SPLITS:
        raise UserError(f"unknown HellaSwag split {split!r}; expected one of {SPLITS}")
    dest = download(f"{base_url}/hellaswag_{split}.jsonl", Path(out_dir) / f"hellaswag_{split}.jsonl")
    load_examples(dest, limit=1)
    return dest
