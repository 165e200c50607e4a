"""Where data lives, and atomic writes: every file the project produces appears whole or not at all (temp file +
rename), with the modes a plain write would give it (temporary files are private; data, checkpoints and exports
are meant to be shared, e.g. a team's data directory on a cluster).
"""

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


def _umask() -> int:
    """The process's umask: from /proc where there is one (reading it elsewhere means setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def make_shareable(path: str | os.PathLike) -> None:
    """Give `path` the modes open() / mkdir() would have (0666 / 0777 less the umask); for a directory, to
    everything in it too. mkstemp and mkdtemp make their files private (0600 / 0700), and so does a rename."""
    path, umask = Path(path), _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest` (an empty file with a plain file's modes); rename it onto `dest` only
    if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    make_shareable(tmp)
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
