"""Token shards: our uint16 `.npy` format (build-nanogpt's), `<prefix>_{val,train}_NNNNNN.npy`, each document
EOT-prefixed; the first shard (index 0) is "val", the rest "train". llm.c's `.bin` shards are read too
(`llmc_shards.py`): `load_shard` recognises each file's format by its content.

Writing (`shard_path`, `write_shard`) and reading (`list_shards`, `load_shard`) with numpy alone: the data
preparation tools import this without torch or Lightning (whose import takes longer than tokenising a small
corpus). The stage-1 DataModule that reads shards into batches is `token_shards.py`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from captioner.data import llmc_shards
from captioner.errors import UserError
from captioner.io import save_npy

MAX_TOKEN = 2**16 - 1
NPY_MAGIC = np.lib.format.MAGIC_PREFIX
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
    """The `*_{split}_NNNNNN.npy` (or llm.c's `.bin`) files in `data_dir`, sorted by name (so by index for one
    prefix). Both formats for one split are refused: most likely the same tokens converted, read twice."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"token shard directory {data_dir} does not exist; create it with `{prepare_hint}`")
    name = re.compile(rf".+_{re.escape(split)}_\d+\.(npy|bin)")
    paths = sorted(p for p in data_dir.glob(f"*_{split}_*") if name.fullmatch(p.name))
    if not paths:
        raise UserError(
            f"no {split} shards (*_{split}_NNNNNN.npy or llm.c's .bin) in {data_dir}; create them with "
            f"`{prepare_hint}`"
        )
    by_format = {suffix: [p.name for p in paths if p.suffix == suffix] for suffix in (".npy", ".bin")}
    if all(by_format.values()):
        found = ", ".join(f"{len(names)} {suffix} ({names[0]}, …)" for suffix, names in by_format.items())
        raise UserError(
            f"{data_dir}: {split} shards in two formats, {found}; keep one format per split (move the others "
            "out) so no tokens are read twice"
        )
    return paths


def load_shard(path: str | Path) -> np.ndarray:
    """Memory-map one shard, ours or llm.c's (recognised by content; a `.bin` that is neither is checked as
    llm.c's), shape (n,) uint16, after checking its header and size (UserError naming the file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as err:
        raise UserError(f"{path}: not a readable token shard ({err})") from err
    if llmc_shards.recognises(head) or (path.suffix == ".bin" and not head.startswith(NPY_MAGIC)):
        return llmc_shards.load(path)
    return _load_npy(path)


def _load_npy(path: Path) -> np.ndarray:
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
