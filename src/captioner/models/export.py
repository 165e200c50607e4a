"""Checkpoints → directories other tools read: a stage-1 LM becomes a transformers `GPT2LMHeadModel` (with the
GPT-2 tokenizer files), a caption checkpoint becomes a self-contained captioner directory (`save_captioner`).

`export_checkpoint` tells the two kinds apart from the checkpoint's hyper-parameters and writes the directory
atomically: it appears whole, or not at all.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from captioner.errors import UserError
from captioner.io import make_shareable
from captioner.models.captioner import CAPTIONER_KEYS, load_captioner, save_captioner
from captioner.models.checkpoints import OURS, checkpoint_format, load_lm
from captioner.models.compact_vocab import CompactVocabGPT
from captioner.models.gpt import GELUS, GPT, HF_TRANSPOSED, load_checkpoint
from captioner.tokenizer import EOT, N_VOCAB, gpt2_encoding

log = logging.getLogger(__name__)

LM, CAPTION = "lm", "caption"  # checkpoint kinds
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def checkpoint_kind(ckpt: dict, path: str | os.PathLike) -> str:
    """LM for a stage-1 checkpoint (hyper_parameters "gpt", or "model" before 0.2), CAPTION for a caption run's."""
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if isinstance(hparams, dict) and all(key in hparams for key in CAPTIONER_KEYS):
        return CAPTION
    if isinstance(hparams, dict) and ("gpt" in hparams or "model" in hparams):
        return LM
    found = sorted(hparams) if isinstance(hparams, dict) else None
    raise UserError(
        f"{path}: neither a stage-1 nor a caption checkpoint (hyper_parameters need `gpt`, or "
        f"{', '.join(CAPTIONER_KEYS)}; found {found})"
    )


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> str:
    """Export a stage-1 or caption checkpoint into the directory `out`; returns the kind (LM or CAPTION).

    `out` must not exist or be empty, unless `force`, which replaces it (only once the new export is complete).
    """
    out = Path(out)
    check_destination(out, force)
    if force and Path(ckpt).resolve().is_relative_to(out.resolve()):
        raise UserError(f"{ckpt} is inside {out}: replacing {out} would delete the checkpoint")
    ours = checkpoint_format(ckpt) == OURS  # else build-nanogpt, nanoGPT or llm.c: a stage-1 LM
    kind = checkpoint_kind(load_checkpoint(ckpt), ckpt) if ours else LM
    if kind == LM:
        model = load_lm(ckpt)
        with fresh_directory(out) as tmp:
            save_hf_gpt2(model, tmp)
            write_tokenizer_files(tmp, model.config.block_size)
    else:
        model, hparams = load_captioner(ckpt)
        with fresh_directory(out) as tmp:
            save_captioner(model, hparams, tmp)
    return kind


# --------------------------------------------------------------------------------------------------------------
# atomic directories


def check_destination(out: Path, force: bool) -> None:
    """Refuse to export over a file or, without `force`, over a directory with anything in it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def fresh_directory(dest: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; once the block succeeds, it replaces `dest` (an existing one
    is moved aside first and deleted last, so `dest` is never half-written). On failure nothing changes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    old = None
    try:
        yield tmp
        make_shareable(tmp)  # mkdtemp's (and transformers' temp files') private modes: an export is shared
        if dest.exists():
            old = dest.with_name(f"{tmp.name}.old")
            dest.rename(old)
        try:
            tmp.rename(dest)
        except OSError:
            if old is not None:
                old.rename(dest)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# stage 1 → transformers GPT-2


def hf_gpt2_config(model: GPT):
    """The transformers `GPT2Config` of our GPT: GPT-2's vocabulary (the padded rows are dropped), no dropout
    (we train without it, so a fine-tune with HF starts from the same model), tied embeddings."""
    from transformers import GPT2Config

    cfg = model.config
    return GPT2Config(
        vocab_size=N_VOCAB,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function={v: k for k, v in GELUS.items()}[cfg.gelu],  # gelu_new: the tanh GELU
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        bos_token_id=EOT,
        eos_token_id=EOT,
        tie_word_embeddings=True,
    )


def hf_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our GPT's weights in HF GPT-2's layout: Conv1D matrices transposed, the first N_VOCAB rows of wte/lm_head."""
    if isinstance(model, CompactVocabGPT):
        raise UserError(
            f"this GPT reads and writes only {model.config.vocab_size} token ids (CompactVocabConfig.vocab_ids): "
            "transformers' GPT-2 has no way to give the others zero probability"
        )
    if model.config.vocab_size < N_VOCAB:
        raise UserError(
            f"vocab_size {model.config.vocab_size} is smaller than GPT-2's {N_VOCAB}: not a GPT-2 tokenizer model"
        )
    if len(model.cross):
        raise UserError("this GPT has cross-attention layers: export the captioner instead")
    sd = {}
    for key, value in model.state_dict().items():
        if key in ("transformer.wte.weight", "lm_head.weight"):
            value = value[:N_VOCAB]  # (N_VOCAB, C): the padding rows are never targets
        elif key.endswith(HF_TRANSPOSED):
            value = value.t()
        sd[key] = value.detach().float().contiguous()
    return sd


def save_hf_gpt2(model: GPT, directory: Path) -> None:
    """config.json, generation_config.json and model.safetensors of a `GPT2LMHeadModel` equal to `model`."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_gpt2_config(model))
    missing, unexpected = hf.load_state_dict(hf_gpt2_state_dict(model), strict=False)
    # older transformers keep the causal mask as a buffer named attn.bias / attn.masked_bias
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise UserError(f"GPT-2 layout mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    hf.save_pretrained(directory)


# --------------------------------------------------------------------------------------------------------------
# the GPT-2 tokenizer as transformers files, from tiktoken's ranks (OpenAI's vocab.json/merges.txt need the hub)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map: byte-level BPE tokens are written as strings of these."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges, in order, that produce tiktoken's `ranks`: a token of rank r is the merge of the two pieces
    that BPE reaches on its own bytes with the merges ranked below r, i.e. those recovered before it."""
    token_of = {rank: token for token, rank in ranks.items()}
    merged: dict[tuple[int, int], int] = {}  # (left rank, right rank) → rank of their merge, lower ranks only
    none = len(ranks)  # no merge for this pair (yet)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [ranks[token[i : i + 1]] for i in range(len(token))]
        pair = [merged.get(p, none) for p in itertools.pairwise(parts)]
        while len(parts) > 2:
            # the leftmost lowest-ranked pair, as tiktoken merges; only its neighbours' pairs change
            best = pair.index(min(pair))
            if pair[best] == none:
                raise UserError(f"token {token!r} (rank {rank}) cannot be built from earlier merges")
            parts[best : best + 2] = [pair[best]]
            del pair[best]
            if best > 0:
                pair[best - 1] = merged.get((parts[best - 1], parts[best]), none)
            if best < len(pair):
                pair[best] = merged.get((parts[best], parts[best + 1]), none)
        merged[(parts[0], parts[1])] = rank
        merges.append((token_of[parts[0]], token_of[parts[1]]))
    return merges


def write_tokenizer_files(directory: Path, max_length: int) -> bool:
    """GPT-2's tokenizer files (TOKENIZER_FILES) into `directory`, built from the local tiktoken BPE. Skipped with
    a warning (returns False) where the BPE cannot be had offline: the model directory is still complete."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        enc = gpt2_encoding()
    except RuntimeError as err:
        log.warning("tokenizer files not written: %s", err)
        return False
    ranks = {enc.decode_single_token_bytes(i): i for i in range(N_VOCAB) if i != EOT}
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    eot = "<|endoftext|>"
    vocab = {**{text(token): i for token, i in ranks.items()}, eot: EOT}
    merges = [(text(a), text(b)) for a, b in recover_merges(ranks)]
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    # tokenizer.json, the fast tokenizer itself, set up as OpenAI GPT-2's on the hub
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    tok.save(str(directory / "tokenizer.json"))
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False}
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, **special}, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return True
