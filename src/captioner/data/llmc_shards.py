"""llm.c's GPT-2 token shards, read only: `<name>_{val,train}_NNNNNN.bin` as its `dev/data/fineweb.py` writes them.

A file is a header of 256 little-endian int32 (magic 20240520, version 1, token count; the rest zero) and then
the tokens as uint16, so its size is exactly 1,024 + 2 × count bytes (llm.c's `dataloader.h` checks the same).
`shards.load_shard` recognises the format by its magic and calls `load` here; our own format stays `.npy`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from captioner.errors import UserError

HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
MAGIC = 20240520
VERSION = 1
# llm.c's Llama 3 shards (uint32 tokens for a 128k vocabulary) share the header layout; named in the refusal
LLAMA3_MAGIC = 20240801


def recognises(head: bytes) -> bool:
    """Whether a file's first bytes carry the llm.c GPT-2 token-shard magic (whatever the version)."""
    return len(head) >= 4 and int.from_bytes(head[:4], "little") == MAGIC


def load(path: str | Path) -> np.ndarray:
    """Memory-map one shard's tokens, shape (n,) uint16, after checking its header and size (UserError naming
    the file and the value found vs expected). The header is read on its own; the tokens are never copied."""
    path = Path(path)
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise UserError(
            f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header of an llm.c token shard"
        )
    magic, version, n = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != MAGIC:
        hint = " (llm.c's Llama 3 format with uint32 tokens; only GPT-2's uint16 shards are read)"
        raise UserError(
            f"{path}: magic {magic}, expected {MAGIC} (llm.c GPT-2 token shard){hint if magic == LLAMA3_MAGIC else ''}"
        )
    if version != VERSION:
        raise UserError(f"{path}: llm.c token shard version {version}, expected {VERSION}")
    if n < 2:
        raise UserError(f"{path}: header says {n} token(s); at least 2 are needed for one (x, y) pair")
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise UserError(f"{path}: {what}: header says {n} tokens ({expected} bytes), file is {size} bytes")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
