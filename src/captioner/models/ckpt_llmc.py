"""llm.c's GPT-2 model files, read only: `gpt2_124M.bin` / `gpt2_124M_bf16.bin` (its train_gpt2.py's `write_model`)
and the `model_NNNNNNNN.bin` files its train_gpt2.cu writes (`gpt2_write_to_checkpoint`).

A file is a header of 256 little-endian int32 (magic 20240326, version, max sequence length, vocab size, layers,
heads, channels, padded vocab size; the rest zero), then every parameter in one dtype (version 3: fp32, 5: bf16),
one kind for all layers before the next (`file_order`), Linear weights as PyTorch stores them (out, in).

llm.c pads wte to a multiple of 128 rows (50,257 → 50,304) for its kernels only: its loss, softmax and sampler
read the first vocab_size logits, so the padded rows (zeros from write_model, random in a C-initialised run) are
dropped and the model has llm.c's real vocabulary, its logits llm.c's over it (llm.c's dev/eval/export_hf.py
drops them too).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from captioner.errors import UserError
from captioner.models.gpt import GPTConfig

HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
MAGIC = 20240326
# version → (dtype on disk, dtype read as): bf16 is stored as its int16 bit patterns
DTYPES = {3: (np.dtype("<f4"), torch.float32), 5: (np.dtype("<i2"), torch.bfloat16)}
# llm.c's other files share the 256-int32 header; each is named when it is passed as a model
OTHER_MAGICS = {
    20240327: "an llm.c debug state file (train_gpt2.py's write_state), not a model",
    20240328: "an llm.c tokenizer file, not a model",
    20240520: "an llm.c GPT-2 token shard (data.*), not a model",
    20240522: "an llm.c eval file (HellaSwag .bin), not a model",
    20240527: "an llm.c optimizer state file (state_*.bin), not a model; pass the model_*.bin beside it",
    20240801: "an llm.c Llama 3 token shard, not a model",
    20240803: "an llm.c Llama 3 model, not GPT-2",
}


def magic_of(head: bytes) -> int | None:
    """The first int32 of a file's first bytes, or None when there are fewer than four."""
    return int.from_bytes(head[:4], "little") if len(head) >= 4 else None


def recognises(head: bytes) -> bool:
    """Whether a file's first bytes carry an llm.c header magic (a GPT-2 model's, or another llm.c file's)."""
    return magic_of(head) == MAGIC or magic_of(head) in OTHER_MAGICS


def file_order(config: GPTConfig, padded_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a model file as (our key, shape), in llm.c's order: one kind for all layers at a time."""
    C = config.n_embd
    per_layer = [
        ("ln_1.weight", (C,)),
        ("ln_1.bias", (C,)),
        ("attn.c_attn.weight", (3 * C, C)),
        ("attn.c_attn.bias", (3 * C,)),
        ("attn.c_proj.weight", (C, C)),
        ("attn.c_proj.bias", (C,)),
        ("ln_2.weight", (C,)),
        ("ln_2.bias", (C,)),
        ("mlp.c_fc.weight", (4 * C, C)),
        ("mlp.c_fc.bias", (4 * C,)),
        ("mlp.c_proj.weight", (C, 4 * C)),
        ("mlp.c_proj.bias", (C,)),
    ]
    return [
        ("transformer.wte.weight", (padded_vocab, C)),
        ("transformer.wpe.weight", (config.block_size, C)),
        *((f"transformer.h.{i}.{name}", shape) for name, shape in per_layer for i in range(config.n_layer)),
        ("transformer.ln_f.weight", (C,)),
        ("transformer.ln_f.bias", (C,)),
    ]


def read_header(path: Path) -> tuple[int, GPTConfig, int]:
    """(version, config, padded vocab) from a model file's header, checked (UserError naming the file)."""
    if os.path.getsize(path) < HEADER_BYTES:
        raise UserError(f"{path}: shorter than the {HEADER_BYTES}-byte header of an llm.c model file")
    header = [int(v) for v in np.fromfile(path, dtype="<i4", count=8)]
    magic, version, max_t, vocab, n_layer, n_head, n_embd, padded = header
    if magic != MAGIC:
        raise UserError(f"{path}: {OTHER_MAGICS.get(magic, f'magic {magic}')} (llm.c models have {MAGIC})")
    if version not in DTYPES:
        raise UserError(
            f"{path}: llm.c model version {version}; versions 3 (fp32) and 5 (bf16) are read (re-export it with "
            "llm.c's train_gpt2.py)"
        )
    try:
        config = GPTConfig(block_size=max_t, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    except UserError as err:
        raise UserError(f"{path}: llm.c header: {err}") from None
    if padded < vocab:
        raise UserError(f"{path}: llm.c header: padded vocab {padded} is smaller than vocab {vocab}")
    return version, config, padded


def read_llmc(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, GPT state dict) of an llm.c model file. The tensors are views of one copy-on-write memory map
    of the file: nothing is read until a model copies them in (bf16 becomes the model's dtype then)."""
    path = Path(path)
    version, config, padded = read_header(path)
    on_disk, dtype = DTYPES[version]
    order = file_order(config, padded)
    count = sum(int(np.prod(shape)) for _, shape in order)  # elements after the header
    size, expected = os.path.getsize(path), HEADER_BYTES + count * on_disk.itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise UserError(
            f"{path}: {what}: its llm.c header (version {version}, {config.n_layer} layers, {config.n_head} heads, "
            f"{config.n_embd} channels, {config.block_size} positions, padded vocab {padded}) makes {expected} "
            f"bytes, the file has {size}"
        )
    # mode "c": writable views for torch (no read-only warning), pages shared with the file until written
    flat = torch.from_numpy(np.memmap(path, dtype=on_disk, mode="c", offset=HEADER_BYTES, shape=(count,)))
    flat = flat.view(dtype)  # (count,): bf16 reinterpreted from its int16 bit patterns, as llm.c writes it
    weights, start = {}, 0
    for key, shape in order:
        n = int(np.prod(shape))
        weights[key] = flat[start : start + n].view(shape)
        start += n
    wte = weights["transformer.wte.weight"][: config.vocab_size]  # (V, C): the padded rows are never read
    weights["transformer.wte.weight"] = weights["lm_head.weight"] = wte  # tied, as in llm.c
    return config, weights
