"""Check (not a test): our stage-1 checkpoint readers against the projects that write the files.

    git -C <build-nanogpt clone> show HEAD:train_gpt2.py > /tmp/bng/train_gpt2.py
    git -C <nanoGPT clone> show HEAD:model.py > /tmp/nanogpt/model.py      # and its train.py beside it
    git -C <nanoGPT clone> show HEAD:train.py > /tmp/nanogpt/train.py
    git -C <llm.c clone> show HEAD:train_gpt2.py > /tmp/llmc/train_gpt2.py
    python scripts/check_neighbours.py --bng /tmp/bng/train_gpt2.py --nanogpt /tmp/nanogpt/model.py \
        --llmc /tmp/llmc/train_gpt2.py

Their own code runs from those files, nothing of it copied here: their GPT builds a tiny random model (every
parameter then perturbed, so that a misplaced bias or LayerNorm shows) and their own save code writes it:
- build-nanogpt: train_gpt2.py's definitions (`bench_pretrain.BuildNanoGPT`), and the block of its training loop
  that `torch.save`s `log/model_NNNNN.pt`, run with `raw_model` the plain and the compiled model (`_orig_mod.`
  keys); its config class pickled as `__main__.GPTConfig`, as when the script runs;
- nanoGPT: model.py imported; the block of train.py that `torch.save`s `ckpt.pt` (after one optimizer step, so
  the file holds a real AdamW state), with bias True and False, compiled or not;
- llm.c: train_gpt2.py imported; its `write_model` at float32 and bfloat16.
Our `read_lm` then loads each file and the script prints the largest |logit difference| of our GPT, and of the
transformers GPT-2 that `captioner-export` writes from it (over GPT-2's 50,257 ids, the rows it keeps), against
their model (a bf16 file: against their model with its weights rounded to bf16, which is what the file holds).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib.util
import io
import os
import sys
import tempfile
from pathlib import Path

import torch
from bench_pretrain import BuildNanoGPT, table

from captioner.models.checkpoints import LLMC, checkpoint_format, load_lm
from captioner.models.ckpt_nanogpt import SAFE_GLOBALS
from captioner.models.export import save_hf_gpt2
from captioner.tokenizer import N_VOCAB


def import_by_path(path: Path, name: str):
    """A neighbour's importable file (nanoGPT's model.py, llm.c's train_gpt2.py) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def save_block(path: Path):
    """The body of the `if` in a training script that calls `torch.save(...)`: how it writes its checkpoint."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and any(
            isinstance(s, ast.Expr)
            and isinstance(s.value, ast.Call)
            and ast.unparse(s.value.func) == "torch.save"
            for s in node.body
        ):
            return compile(ast.Module(node.body, []), str(path), "exec", dont_inherit=True)
    raise SystemExit(f"{path}: no `if ...:` block that calls torch.save(...); is this the right file?")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter: their inits leave biases at 0 and LayerNorms at 1, which hides a misplacement."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=generator))


@torch.no_grad()
def compare(path: Path, theirs: torch.Tensor, idx: torch.Tensor, tmp: Path) -> list:
    """[format read, key prefix, vocab, max |Δ| ours, max |Δ| transformers export] for one file, against their
    logits (B, T, V)."""
    ours = load_lm(path).eval()
    logits = ours(idx)[0]  # (B, T, V)
    if logits.shape != theirs.shape:
        raise AssertionError(f"{path.name}: our logits {tuple(logits.shape)} vs theirs {tuple(theirs.shape)}")
    from transformers import GPT2LMHeadModel

    export = tmp / f"{path.name}.hf"
    save_hf_gpt2(ours, export)
    hf = GPT2LMHeadModel.from_pretrained(export).eval()
    hf_logits = hf(idx).logits  # (B, T, N_VOCAB)
    return [
        checkpoint_format(path),
        key_prefix(path),
        ours.config.vocab_size,
        f"{(logits - theirs).abs().max().item():.2e}",
        f"{(hf_logits - theirs[..., :N_VOCAB]).abs().max().item():.2e}",
    ]


def key_prefix(path: Path) -> str:
    """Whether the state dict a torch file holds was saved from a compiled model (`_orig_mod.` keys)."""
    if checkpoint_format(path) == LLMC:
        return "-"
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        keys = torch.load(path, weights_only=True, mmap=True)["model"]
    return "_orig_mod." if all(k.startswith("_orig_mod.") for k in keys) else "plain"


def quietly(fn, *args, **kwargs):
    """Their code prints progress lines; keep the report to the table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def check_bng(path: Path, shape: dict, idx: torch.Tensor, tmp: Path, seed: int) -> list[list]:
    bng = BuildNanoGPT(path)
    ns = bng.namespace
    # run as a script, train_gpt2.py's classes live in __main__: its pickles name __main__.GPTConfig
    ns["GPTConfig"].__module__ = "__main__"
    sys.modules["__main__"].GPTConfig = ns["GPTConfig"]
    torch.manual_seed(seed)
    model = ns["GPT"](ns["GPTConfig"](vocab_size=50304, **shape)).eval()  # its script's vocab
    perturb(model, seed)
    theirs = model(idx)[0]  # (B, T, 50304)
    rows, code = [], save_block(path)
    for label, raw_model in (("plain", model), ("compiled", torch.compile(model))):
        log_dir = tmp / f"bng_{label}"
        log_dir.mkdir()
        run = {
            **ns,
            "raw_model": raw_model,
            "step": 19072,
            "val_loss_accum": torch.tensor(3.28),
            "log_dir": str(log_dir),
        }
        exec(code, run)
        (saved,) = log_dir.glob("model_*.pt")
        rows.append([f"build-nanogpt {saved.name} ({label})", *compare(saved, theirs, idx, tmp)])
    if bng.skipped_imports:
        print(
            f"build-nanogpt: skipped imports (not used to build or save a model): {'; '.join(bng.skipped_imports)}"
        )
    return rows


def check_nanogpt(path: Path, shape: dict, idx: torch.Tensor, tmp: Path, seed: int) -> list[list]:
    train = path.with_name("train.py")
    if not train.is_file():
        raise SystemExit(f"{train}: nanoGPT's train.py must sit beside model.py (it writes the checkpoint)")
    nanogpt = import_by_path(path, "nanogpt_model")
    code, rows = save_block(train), []
    for bias, compiled in ((True, False), (False, True), (False, False)):
        torch.manual_seed(seed)
        # 50,304: train.py's vocab when the dataset has no meta.pkl
        conf = nanogpt.GPTConfig(vocab_size=50304, bias=bias, dropout=0.0, **shape)
        model = quietly(nanogpt.GPT, conf)
        optimizer = quietly(model.configure_optimizers, 0.1, 6e-4, (0.9, 0.95), "cpu")
        model(idx, idx)[1].backward()
        optimizer.step()
        perturb(model, seed)
        model.eval()
        # with targets, its forward returns every position's logits
        theirs = model(idx, idx)[0]  # (B, T, 50304)
        # the keys of train.py's model_args
        model_args = {
            k: getattr(conf, k)
            for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
        }
        out_dir = tmp / f"nanogpt_bias{bias}_compiled{compiled}"
        out_dir.mkdir()
        run = {
            "os": os,
            "torch": torch,
            "raw_model": torch.compile(model) if compiled else model,
            "optimizer": optimizer,
            "model_args": model_args,
            "iter_num": 2000,
            "best_val_loss": torch.tensor(3.3),
            "config": {"out_dir": str(out_dir), "bias": bias, "compile": compiled},
            "out_dir": str(out_dir),
        }
        quietly(exec, code, run)
        label = f"bias={bias}{', compiled' if compiled else ''}"
        rows.append([f"nanoGPT ckpt.pt ({label})", *compare(out_dir / "ckpt.pt", theirs, idx, tmp)])
    return rows


def check_llmc(path: Path, shape: dict, idx: torch.Tensor, tmp: Path, seed: int) -> list[list]:
    llmc = import_by_path(path, "llmc_train_gpt2")
    # its write_model pads exactly 50,257 rows (it asserts so)
    model = llmc.GPT(llmc.GPTConfig(vocab_size=N_VOCAB, **shape)).eval()
    perturb(model, seed)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    rows = []
    for dtype, reference in (("float32", model), ("bfloat16", rounded)):
        file = tmp / f"gpt2_tiny_{dtype}.bin"
        quietly(llmc.write_model, model, str(file), dtype)
        theirs = reference(idx, idx)[0]  # (B, T, 50257)
        rows.append([f"llm.c {file.name} (write_model)", *compare(file, theirs, idx, tmp)])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bng", type=Path, help="build-nanogpt's train_gpt2.py")
    parser.add_argument("--nanogpt", type=Path, help="nanoGPT's model.py (train.py beside it)")
    parser.add_argument("--llmc", type=Path, help="llm.c's train_gpt2.py")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.bng or args.nanogpt or args.llmc):
        parser.error("give at least one of --bng, --nanogpt, --llmc")
    shape = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(0, N_VOCAB, (2, 24), generator=torch.Generator().manual_seed(args.seed))  # (B, T)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its save/load bars around every export
    rows = []
    with tempfile.TemporaryDirectory(prefix="check_neighbours_") as tmp:
        for given, check in ((args.bng, check_bng), (args.nanogpt, check_nanogpt), (args.llmc, check_llmc)):
            if given:
                rows += check(given.resolve(), shape, idx, Path(tmp), args.seed)
    print(f"tiny models {shape}, {idx.shape[0]} x {idx.shape[1]} random GPT-2 token ids, fp32 on the CPU")
    headers = ["file (their code wrote it)", "read as", "keys", "vocab", "max |Δ logit| ours", "HF export"]
    print(table(headers, rows, left=3))
    if args.nanogpt:
        print(
            "nanoGPT's MLP uses the exact (erf) GELU, ours and GPT-2's the tanh form: its rows differ by that"
        )


if __name__ == "__main__":
    main()
