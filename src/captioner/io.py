"""Where data lives, and atomic writes: every file the project produces appears whole or not at all (temp file +
rename)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def data_dir(*parts: str) -> Path:
    """`$CAPTIONER_DATA_DIR/<parts>` (default `data/`): the CLIs' default paths, as configs/paths/default.yaml."""
    return Path(os.environ.get("CAPTIONER_DATA_DIR", "data"), *parts)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(dest: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_json(dest: str | os.PathLike, obj, **kwargs) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, **kwargs))


def save_text(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
