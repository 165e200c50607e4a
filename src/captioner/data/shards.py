"""The uint16 token shard format (build-nanogpt's): `<prefix>_{val,train}_NNNNNN.npy`, each document EOT-prefixed;
the first shard (index 0) is "val", the rest "train".

Writing (`shard_path`, `write_shard`) and reading (`list_shards`, `load_shard`) with numpy alone: the data
preparation tools import this without torch or Lightning (whose import takes longer than tokenising a small
corpus). The stage-1 DataModule that reads shards into batches is `token_shards.py`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from captioner.errors import UserError
from captioner.io import save_npy

MAX_TOKEN = 2**16 - 1
DEFAULT_PREPARE_HINT = "captioner-prepare fineweb"


def shard_path(out_dir: str | Path, prefix: str, split: str, index: int) -> Path:
    return Path(out_dir) / f"{prefix}_{split}_{index:06d}.npy"


def split_of(index: int) -> str:
    """Shard 0 is the validation shard, every later one training data (build-nanogpt's convention)."""
    return "val" if index == 0 else "train"


def write_shard(path: str | Path, tokens) -> None:
    """Write a 1-D token array as uint16 .npy, atomically; ids must fit in 16 bits (GPT-2's 50257 do)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise UserError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN):
        raise UserError(f"{path}: token ids outside uint16 range [0, {MAX_TOKEN}]")
    save_npy(path, tokens.astype(np.uint16, copy=False))


def list_shards(data_dir: str | Path, split: str, prepare_hint: str = DEFAULT_PREPARE_HINT) -> list[Path]:
    """The `*_{split}_NNNNNN.npy` files in `data_dir`, sorted by name (so by index for one prefix)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"token shard directory {data_dir} does not exist; create it with `{prepare_hint}`")
    name = re.compile(rf".+_{re.escape(split)}_\d+\.npy")
    paths = sorted(p for p in data_dir.glob(f"*_{split}_*.npy") if name.fullmatch(p.name))
    if not paths:
        raise UserError(
            f"no {split} shards (*_{split}_NNNNNN.npy) in {data_dir}; create them with `{prepare_hint}`"
        )
    return paths


def load_shard(path: str | Path) -> np.ndarray:
    """Memory-map one shard, shape (n,) uint16, after checking its header and size (ValueError naming the file)."""
    path = Path(path)
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise UserError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise UserError(f"{path}: not a readable .npy token shard ({err})") from err
    if dtype != np.uint16:
        raise UserError(f"{path}: token shard dtype is {dtype}, expected uint16")
    if len(shape) != 1:
        raise UserError(f"{path}: token shard must be 1-D, got shape {shape}")
    (n,) = shape
    if n < 2:
        raise UserError(f"{path}: token shard holds {n} token(s); at least 2 are needed for one (x, y) pair")
    expected, actual = offset + 2 * n, os.path.getsize(path)
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise UserError(f"{path}: {what}: header says {n} tokens ({expected} bytes), file is {actual} bytes")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(n,))
