"""Where a stage-1 language model comes from: `read_lm` reads every checkpoint format we accept into our
GPTConfig and GPT state dict, telling them apart by content (never by file name):

- ours: a captioner-train stage-1 Lightning checkpoint (`gpt.read_lm_checkpoint`);
- build-nanogpt `log/model_NNNNN.pt` and nanoGPT `out/ckpt.pt` (`ckpt_nanogpt`);
- llm.c model files, fp32 or bf16 (`ckpt_llmc`).

Nothing pickled runs: torch files load with `weights_only=True`, build-nanogpt's config class allow-listed as a
plain holder of its fields; any other global in a file is refused.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from captioner.errors import UserError
from captioner.models import ckpt_llmc, ckpt_nanogpt
from captioner.models.compact_vocab import build_lm, lm_config
from captioner.models.gpt import GPT, GPTConfig, read_lm_checkpoint
from captioner.tokenizer import N_VOCAB

OURS, BUILD_NANOGPT, NANOGPT, LLMC = "captioner", "build-nanogpt", "nanoGPT", "llm.c"
ACCEPTED = (
    "formats read: a captioner-train stage-1 checkpoint (.ckpt), build-nanogpt log/model_NNNNN.pt, "
    "nanoGPT out/ckpt.pt, llm.c model .bin (fp32 or bf16)"
)


def read_lm(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, GPT state dict) of a stage-1 LM in any format we read (UserError naming the file otherwise).
    Tensors may be memory-mapped views of the file: `GPT.load_state_dict` copies them in."""
    path = Path(path)
    kind, ckpt = _open(path)
    if kind == OURS:
        fields, weights = read_lm_checkpoint(path, ckpt)  # the file is read once
        config = lm_config(fields, path)  # a GPTConfig, or its compact-vocabulary kind
    elif kind == BUILD_NANOGPT:
        config, weights = ckpt_nanogpt.read_build_nanogpt(ckpt, path)
    elif kind == NANOGPT:
        config, weights = ckpt_nanogpt.read_nanogpt(ckpt, path)
    else:
        config, weights = ckpt_llmc.read_llmc(path)
    if kind != OURS and config.vocab_size < N_VOCAB:
        raise UserError(
            f"{path}: a {kind} model with vocab_size {config.vocab_size}, fewer than GPT-2's {N_VOCAB} tokens "
            "(a character-level model?); this project reads GPT-2 BPE models"
        )
    check_weights(config, weights, path, kind)
    return config, weights


def load_lm(path: str | os.PathLike) -> GPT:
    """The LM of a stage-1 checkpoint in any format `read_lm` reads (`build_lm`'s kind), on the CPU, in fp32."""
    return build_lm(*read_lm(path))


def checkpoint_format(path: str | os.PathLike) -> str:
    """OURS (any captioner-train checkpoint: stage 1 or caption), BUILD_NANOGPT, NANOGPT or LLMC."""
    return _open(Path(path))[0]


def _open(path: Path) -> tuple[str, dict | None]:
    """A file's format, and for a torch file what it holds (loaded memory-mapped, weights only)."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if ckpt_llmc.recognises(head):
        return LLMC, None
    ckpt = _load_torch(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: a torch file holding a {type(ckpt).__name__}, not a checkpoint; {ACCEPTED}")
    if "hyper_parameters" in ckpt or "state_dict" in ckpt:
        return OURS, ckpt
    if ckpt_nanogpt.is_build_nanogpt(ckpt):
        return BUILD_NANOGPT, ckpt
    if ckpt_nanogpt.is_nanogpt(ckpt):
        return NANOGPT, ckpt
    raise UserError(f"{path}: a torch checkpoint with keys {sorted(map(str, ckpt))[:8]}; {ACCEPTED}")


def _load_torch(path: Path):
    """torch.load, weights only, memory-mapped; build-nanogpt's `__main__.GPTConfig` the one extra global."""
    with torch.serialization.safe_globals(ckpt_nanogpt.SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            what = f"pickles {', '.join(refused)}" if refused else "holds objects"
            raise UserError(f"{path}: {what}, which a weights-only load refuses to run; {ACCEPTED}") from None
        except Exception as err:  # RuntimeError/EOFError/...: not a torch.save zip at all
            reason = (str(err).strip().splitlines() or [""])[0]
            raise UserError(
                f"{path}: not a checkpoint we can read ({type(err).__name__}: {reason}); {ACCEPTED}"
            ) from None


def check_weights(config: GPTConfig, weights: dict, path: Path, kind: str) -> None:
    """`weights` must have exactly the keys and shapes of GPT(config)'s state dict, which every kind of LM shares
    (UserError naming the file)."""
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {key: tuple(value.shape) for key, value in GPT(config).state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{key} {tuple(getattr(weights[key], 'shape', ()))} vs {shape}"
        for key, shape in expected.items()
        if key in weights
        and (not isinstance(weights[key], torch.Tensor) or tuple(weights[key].shape) != shape)
    ]
    if missing or unexpected or wrong:
        raise UserError(
            f"{path}: {kind} weights do not fit its config ({config.n_layer} layers, {config.n_head} heads, "
            f"{config.n_embd} channels, vocab {config.vocab_size}): missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, shapes (found vs expected) {wrong[:4]}"
        )
