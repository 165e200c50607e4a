"""Stage-1 checkpoints in every format we read, written here by small writers of our own that follow each project's
documented layout (build-nanogpt's train_gpt2.py, nanoGPT's train.py, llm.c's write_model / gpt2_build_from_checkpoint):
recognised by content, loaded to the same logits, and anything else refused in one line naming the file."""

import copy
import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

from captioner.errors import UserError
from captioner.models import checkpoints
from captioner.models.checkpoints import checkpoint_format, load_lm, read_lm
from captioner.models.compact_vocab import CompactVocabConfig, build_lm
from captioner.models.gpt import GPT, GPTConfig, load_checkpoint, read_lm_checkpoint

SHAPE = dict(block_size=16, n_layer=2, n_head=2, n_embd=8)


def random_gpt(vocab_size: int = 50304, seed: int = 0, gelu: str = "tanh") -> GPT:
    """A tiny GPT whose every parameter is random (biases and LayerNorms too, so a misplaced one shows)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, gelu=gelu, **SHAPE))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def logits(model: GPT) -> torch.Tensor:
    idx = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        return model(idx)[0]  # (B, T, V)


def one_line_error(path, match: str) -> str:
    with pytest.raises(UserError, match=match) as err:
        read_lm(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    return str(err.value)


# --- build-nanogpt: {"model", "config": __main__.GPTConfig, "step", "val_loss"} --------------------------------


@dataclasses.dataclass
class BngConfig:
    """build-nanogpt's GPTConfig as its train_gpt2.py defines it, named as pickle sees it when the script runs."""

    __module__ = "__main__"
    __qualname__ = "GPTConfig"
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


@pytest.fixture
def bng_class(monkeypatch):
    """`__main__.GPTConfig` must name the class for pickle to save it, as in train_gpt2.py's own process."""
    monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", BngConfig, raising=False)


def write_bng(path, model: GPT, compiled: bool = False, **extra) -> None:
    prefix = "_orig_mod." if compiled else ""
    config = BngConfig(
        **{f: getattr(model.config, f) for f in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    )
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "config": config, "step": 19072, "val_loss": 3.28, **extra}, path)


@pytest.mark.parametrize("compiled", [False, True])
def test_build_nanogpt_loads_with_the_same_logits(tmp_path, bng_class, compiled):
    model = random_gpt()
    path = tmp_path / "model_19072.pt"
    write_bng(path, model, compiled)

    assert checkpoint_format(path) == checkpoints.BUILD_NANOGPT
    loaded = load_lm(path)
    assert loaded.config == model.config  # vocab 50,304 kept: its padded rows are trained weights
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    # the stand-in is allowed only inside read_lm: a plain weights-only load still refuses the file
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(path)


class Smuggled:
    def __init__(self, victim):
        self.victim = str(victim)

    def __reduce__(self):
        return (os.remove, (self.victim,))


def test_build_nanogpt_with_another_global_is_refused_and_nothing_runs(tmp_path, bng_class):
    victim = tmp_path / "keep.txt"
    victim.write_text("still here")
    path = tmp_path / "model_05000.pt"
    write_bng(path, random_gpt(), extra=Smuggled(victim))

    one_line_error(path, r"pickles posix\.remove, which a weights-only load refuses")
    assert victim.read_text() == "still here"


def test_build_nanogpt_config_with_other_fields_is_refused(tmp_path, bng_class, monkeypatch):
    path = tmp_path / "model_05000.pt"
    write_bng(path, random_gpt())
    ckpt = torch.load(path, weights_only=False)
    ckpt["config"].bias = False  # a fork whose model differs: its maths is not ours
    torch.save(ckpt, path)
    one_line_error(path, r"build-nanogpt config must have the fields .*unknown \['bias'\]")


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path, bng_class):
    model = random_gpt()
    path = tmp_path / "model_05000.pt"
    write_bng(path, model)
    ckpt = torch.load(path, weights_only=False)
    del ckpt["model"]["transformer.h.1.mlp.c_fc.bias"]
    ckpt["model"]["transformer.wpe.weight"] = torch.zeros(8, 8)
    torch.save(ckpt, path)
    one_line_error(
        path,
        r"weights do not fit .*missing \['transformer.h.1.mlp.c_fc.bias'\].*transformer.wpe.weight \(8, 8\)",
    )


# --- nanoGPT: {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} -------------------------


def write_nanogpt(
    path, model: GPT, bias: bool, compiled: bool = False, vocab_size: int | None = None
) -> None:
    cfg = model.config
    state = {k: v for k, v in model.state_dict().items() if bias or not k.endswith(".bias")}
    for i in range(cfg.n_layer):  # the causal mask it registers when flash attention is missing
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(cfg.block_size, cfg.block_size).tril()[None, None]
    prefix = "_orig_mod." if compiled else ""
    trained = copy.deepcopy(model)  # one AdamW step on a copy: a real optimizer state, the weights untouched
    optimizer = torch.optim.AdamW(trained.parameters())
    trained(torch.zeros(1, 3, dtype=torch.long))[0].sum().backward()
    optimizer.step()
    model_args = dict(
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        block_size=cfg.block_size,
        bias=bias,
        vocab_size=vocab_size or cfg.vocab_size,
        dropout=0.1,
    )
    ckpt = {
        "model": {prefix + k: v for k, v in state.items()},
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 2000,
        "best_val_loss": torch.tensor(3.3),
        "config": {"out_dir": "out", "compile": compiled, "bias": bias},
    }
    torch.save(ckpt, path)


@pytest.mark.parametrize("bias,compiled", [(True, False), (False, True)])
def test_nanogpt_loads_with_the_same_logits(tmp_path, bias, compiled):
    model = random_gpt(gelu="none")  # nanoGPT's MLP: nn.GELU(), the exact one
    if not bias:  # nanoGPT's bias=False model is ours with zero biases
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
    path = tmp_path / "ckpt.pt"
    write_nanogpt(path, model, bias, compiled)
    reference = logits(model)

    assert checkpoint_format(path) == checkpoints.NANOGPT
    loaded = load_lm(path)
    assert loaded.config == model.config
    torch.testing.assert_close(logits(loaded), reference, atol=0, rtol=0)
    if not bias:
        assert not loaded.transformer.h[1].mlp.c_fc.bias.any() and not loaded.transformer.ln_f.bias.any()


def test_a_character_level_model_is_refused(tmp_path):
    model = GPT(GPTConfig(vocab_size=65, **SHAPE))  # nanoGPT's shakespeare_char
    path = tmp_path / "ckpt.pt"
    write_nanogpt(path, model, bias=False)
    one_line_error(path, r"a nanoGPT model with vocab_size 65, fewer than GPT-2's 50257 tokens")


# --- llm.c: 256 int32 header, then every tensor in its order, fp32 (version 3) or bf16 (version 5) ---------------

LLMC_PER_LAYER = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]


def write_llmc(path, model: GPT, version: int = 3, padded: int = 50304, header: dict | None = None) -> None:
    """llm.c's model file: header ints [magic, version, maxT, V, L, NH, C, Vp], wte padded to Vp rows (random, as
    in a C-initialised run), then wpe, each per-layer kind for all layers, ln_f."""
    cfg, sd = model.config, model.state_dict()
    ints = np.zeros(256, dtype="<i4")
    ints[:8] = [
        20240326,
        version,
        cfg.block_size,
        cfg.vocab_size,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        padded,
    ]
    for index, value in (header or {}).items():
        ints[index] = value
    wte = torch.cat([sd["transformer.wte.weight"], torch.randn(padded - cfg.vocab_size, cfg.n_embd)])
    tensors = [wte, sd["transformer.wpe.weight"]]
    tensors += [sd[f"transformer.h.{i}.{name}"] for name in LLMC_PER_LAYER for i in range(cfg.n_layer)]
    tensors += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    with open(path, "wb") as f:
        f.write(ints.tobytes())
        for t in tensors:
            t = t.detach().float().contiguous()
            f.write((t if version == 3 else t.to(torch.bfloat16).view(torch.int16)).numpy().tobytes())


def test_llmc_fp32_loads_with_the_same_logits_over_the_real_vocab(tmp_path):
    model = random_gpt(vocab_size=50257)
    path = tmp_path / "gpt2_124M.bin"
    write_llmc(path, model)

    assert checkpoint_format(path) == checkpoints.LLMC
    config, weights = read_lm(path)
    assert config == model.config  # the padded rows are dropped: llm.c never reads them
    # every tensor is a view of one memory map of the file: nothing is copied before a model loads it
    assert len({w.untyped_storage().data_ptr() for w in weights.values()}) == 1
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]
    torch.testing.assert_close(logits(load_lm(path)), logits(model), atol=0, rtol=0)


def test_llmc_bf16_loads_as_the_rounded_model(tmp_path):
    model = random_gpt(vocab_size=50257)
    path = tmp_path / "model_00010000.bin"
    write_llmc(path, model, version=5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())

    loaded = load_lm(path)
    assert loaded.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


@pytest.mark.parametrize(
    "header,cut,match",
    [
        ({1: 1}, 0, r"llm.c model version 1; versions 3 \(fp32\) and 5 \(bf16\) are read"),
        ({0: 20240527}, 0, r"an llm.c optimizer state file .*not a model; pass the model_\*.bin"),
        ({}, 4, r"truncated: its llm.c header .* makes \d+ bytes, the file has \d+"),
        ({}, -4, r"has trailing bytes"),
        ({5: 3}, 0, r"llm.c header: GPTConfig.n_embd \(8\) must be divisible by GPTConfig.n_head \(3\)"),
        ({7: 50000}, 0, r"padded vocab 50000 is smaller than vocab 50257"),
    ],
)
def test_llmc_bad_files_are_one_line(tmp_path, header, cut, match):
    path = tmp_path / "gpt2_124M.bin"
    write_llmc(path, random_gpt(vocab_size=50257), header=header)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut] if cut > 0 else data + bytes(-cut))
    one_line_error(path, match)


# --- ours, and what is none of them -------------------------------------------------------------------------------


def write_ours(path, model: GPT) -> None:
    state = {f"model._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"gpt": dataclasses.asdict(model.config)}, "state_dict": state}, path)


def test_ours_goes_through_read_lm_checkpoint(tmp_path):
    model = random_gpt()
    path = tmp_path / "last.ckpt"
    write_ours(path, model)

    assert checkpoint_format(path) == checkpoints.OURS
    config, weights = read_lm(path)
    ref_fields, ref_weights = read_lm_checkpoint(path)
    assert dataclasses.asdict(config) == ref_fields and weights.keys() == ref_weights.keys()
    torch.testing.assert_close(logits(load_lm(path)), logits(model), atol=0, rtol=0)


def test_ours_with_a_compact_vocabulary_keeps_its_kind(tmp_path):
    torch.manual_seed(0)
    model = build_lm(CompactVocabConfig(vocab_ids=[11, 50256, 262, 318], **SHAPE)).eval()
    path = tmp_path / "last.ckpt"
    write_ours(path, model)

    loaded = load_lm(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_formats_are_told_by_content_not_name(tmp_path, bng_class):
    bng, llmc = tmp_path / "weights.bin", tmp_path / "ckpt.pt"
    write_bng(bng, random_gpt())
    write_llmc(llmc, random_gpt(vocab_size=50257))
    assert checkpoint_format(bng) == checkpoints.BUILD_NANOGPT
    assert checkpoint_format(llmc) == checkpoints.LLMC


def test_anything_else_names_the_file_and_the_formats(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a model" * 20)
    assert "formats read: a captioner-train stage-1 checkpoint" in one_line_error(
        junk, "not a checkpoint we can read"
    )
    other = tmp_path / "other.pt"
    torch.save({"weights": {}, "epoch": 3}, other)
    one_line_error(
        other, r"a torch checkpoint with keys \['epoch', 'weights'\]; formats read: .*llm.c model .bin"
    )
    torch.save([torch.zeros(2)], other)
    one_line_error(other, "a torch file holding a list, not a checkpoint")
    with pytest.raises(UserError, match="checkpoint not found"):
        read_lm(tmp_path / "missing.pt")


def test_the_caption_stage_starts_from_each_neighbours_lm(tmp_path, bng_class):
    """model.lm.ckpt= a build-nanogpt, nanoGPT or llm.c file: the captioner's LM is that model exactly."""
    from captioner.models.captioner import build_captioner

    model = random_gpt()
    write_bng(tmp_path / "model_19072.pt", model)
    write_nanogpt(tmp_path / "ckpt.pt", model, bias=True)
    write_llmc(tmp_path / "gpt2_124M.bin", model)
    clip = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32
    )
    for name in ("model_19072.pt", "ckpt.pt", "gpt2_124M.bin"):
        lm = {"ckpt": str(tmp_path / name)}
        captioner = build_captioner(lm, {"clip_config": {**clip, "patch_size": 16}}, pretrained=True)
        ours = {k: v for k, v in captioner.lm.state_dict().items() if not k.startswith("cross.")}
        theirs = model.state_dict()
        for key, value in ours.items():  # llm.c drops the padded vocabulary rows: compare the real ones
            torch.testing.assert_close(value, theirs[key][: len(value)], atol=0, rtol=0, msg=f"{name}: {key}")


def test_captioner_export_turns_a_neighbours_lm_into_a_transformers_gpt2(tmp_path, bng_class):
    from transformers import GPT2LMHeadModel

    from captioner.models.export import LM, export_checkpoint

    model = random_gpt()
    write_llmc(tmp_path / "gpt2_124M.bin", model)
    assert export_checkpoint(tmp_path / "gpt2_124M.bin", tmp_path / "hf") == LM
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            hf(idx).logits[..., :50257], logits(model)[..., :50257], atol=1e-5, rtol=1e-5
        )


def test_the_gelu_kind_changes_the_logits_and_survives_the_export(tmp_path):
    from transformers import GPT2LMHeadModel

    from captioner.models.export import save_hf_gpt2

    exact, tanh = random_gpt(gelu="none"), random_gpt(gelu="tanh")
    assert not torch.allclose(logits(exact), logits(tanh))  # the same weights, another function
    save_hf_gpt2(exact, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == "gelu"
    idx = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, logits(exact)[..., :50257], atol=1e-5, rtol=1e-5)
    assert GPT.from_pretrained(tmp_path / "hf").config.gelu == "none"
    with pytest.raises(UserError, match=r"GPTConfig\.gelu must be one of tanh, none"):
        GPTConfig(gelu="relu")
