"""Export: stage-1 → transformers GPT-2 (same logits, tokenizer = tiktoken's), caption → captioner directory
(same logits and captions), atomic output directories."""

import dataclasses
import json
import os

import pytest
import torch

from captioner.errors import UserError
from captioner.models.captioner import CONFIG_FILE, WEIGHTS_FILE, build_captioner, load_captioner
from captioner.models.compact_vocab import CompactVocabConfig, build_lm, lm_config
from captioner.models.export import (
    CAPTION,
    LM,
    TOKENIZER_FILES,
    export_checkpoint,
    fresh_directory,
    recover_merges,
)
from captioner.models.gpt import GPT, GPTConfig
from captioner.tokenizer import EOT, N_VOCAB, gpt2_encoding
from tests.helpers import TINY_CLIP

TEXTS = [
    "Hello world",
    "  leading spaces, trailing   ",
    "it's we'll they're I'M don't",
    "tabs\tand\nnew lines\n\n  \n",
    "Ünïcödé ✓ 日本語 🤖 naïve café",
    "12345 3.14159 +-*/ 1,000,000",
    "a dog on a skateboard.<|endoftext|>A red cube left of a blue sphere",
]


def save_lightning_checkpoint(path, hparams: dict, model: torch.nn.Module) -> None:
    """What a Lightning checkpoint holds for these purposes: plain-data hyper-parameters, `model.` weights."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state, "global_step": 0}, path)


def trained_looking_gpt() -> GPT:
    """A tiny GPT with every parameter moved off its init (non-zero biases, non-unit LayerNorms), so a transposed
    or misplaced weight would change the logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
    """(our GPT, its exported transformers directory), exported through a fake stage-1 checkpoint."""
    tmp = tmp_path_factory.mktemp("lm")
    model = trained_looking_gpt()
    save_lightning_checkpoint(tmp / "last.ckpt", {"gpt": dataclasses.asdict(model.config)}, model)
    assert export_checkpoint(tmp / "last.ckpt", tmp / "hf") == LM
    return model, tmp / "hf"


def test_stage1_export_loads_in_transformers_with_the_same_logits(lm_export):
    from transformers import AutoModelForCausalLM

    model, out = lm_export
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.vocab_size == N_VOCAB
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    idx = torch.randint(0, N_VOCAB, (2, 40))
    with torch.no_grad():
        ours = model(idx)[0][..., :N_VOCAB]  # the padded vocab's extra rows are not exported
        theirs = hf(idx).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max abs logits diff, ours vs transformers: {diff:.2e}")
    assert theirs.shape == ours.shape and diff <= 1e-4

    # HF's greedy generate follows our argmax
    prompt = idx[:1, :5]
    generated = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=EOT)
    tokens = prompt
    with torch.no_grad():
        for _ in range(8):
            next_id = model(tokens)[0][:, -1, :N_VOCAB].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_id], dim=1)
    assert generated.tolist() == tokens.tolist()


def test_stage1_export_reads_back_with_gpt_from_pretrained(lm_export):
    model, out = lm_export
    back = GPT.from_pretrained(out)
    assert back.config == dataclasses.replace(model.config, vocab_size=N_VOCAB)
    idx = torch.randint(0, N_VOCAB, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0][..., :N_VOCAB], atol=1e-5, rtol=0)


def test_exported_tokenizer_encodes_like_tiktoken(lm_export):
    from transformers import AutoTokenizer

    _, out = lm_export
    assert all((out / name).is_file() for name in TOKENIZER_FILES)
    tok = AutoTokenizer.from_pretrained(out)
    enc = gpt2_encoding()
    assert len(tok) == N_VOCAB and tok.eos_token_id == EOT and tok.bos_token_id == EOT
    for text in TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    assert len((out / "merges.txt").read_text().splitlines()) == 1 + 50_000  # header + GPT-2's 50,000 merges


def test_recover_merges_rebuilds_a_toy_bpe():
    # "ab" (rank 3) then "abc" (4) = ab + c; "bc" (5) comes after "abc", so it cannot be abc's merge
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5}
    assert recover_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c")]
    with pytest.raises(ValueError, match="cannot be built from earlier merges"):
        recover_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_stage1_export_refuses_a_vocab_smaller_than_gpt2s(tmp_path):
    model = GPT(GPTConfig.named("tiny", vocab_size=1000))
    save_lightning_checkpoint(tmp_path / "lm.ckpt", {"model": dataclasses.asdict(model.config)}, model)
    with pytest.raises(ValueError, match="vocab_size 1000 is smaller than GPT-2's 50257"):
        export_checkpoint(tmp_path / "lm.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "lm.ckpt"]


@pytest.mark.parametrize("layout", ["now", "before CompactVocabConfig"])
def test_stage1_export_refuses_an_lm_over_a_compact_vocabulary(tmp_path, layout):
    model = build_lm(CompactVocabConfig.named("tiny", vocab_ids=[5, 9, EOT]))
    fields = dataclasses.asdict(model.config)
    if layout != "now":  # GPTConfig held vocab_ids, with GPT-2's vocab_size beside them
        fields["vocab_size"] = 50304
    save_lightning_checkpoint(tmp_path / "lm.ckpt", {"gpt": fields}, model)
    with pytest.raises(UserError, match="reads and writes only 3 token ids"):
        export_checkpoint(tmp_path / "lm.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# caption checkpoints


def tiny_caption_checkpoint(path, lm_source: dict | None = None, **lm_overrides):
    """A tiny captioner with open gates, saved the way a caption run saves it; returns the model."""
    torch.manual_seed(0)
    lm = {"config": dataclasses.asdict(lm_config({"name": "tiny", **lm_overrides}))}
    vision = {"clip": None, "clip_config": TINY_CLIP}
    model = build_captioner(lm, vision, cross_every=1).eval()
    with torch.no_grad():
        for cross in model.lm.cross.values():  # open the gates, so the image matters
            cross.attn_gate.fill_(1.0)
            cross.ff_gate.fill_(0.5)
    hparams = {
        "lm": {**lm, **(lm_source or {})},
        "vision": vision,
        "cross_every": 1,
        "trainable": ["xattn", "projection"],
        "optim": {"lr": 1e-4},
        "generation": {"max_new_tokens": 7, "num_beams": 2},
        "scorers": {"captions": {"_target_": "captioner.eval.caption_metrics.CaptionScorer"}},
    }
    save_lightning_checkpoint(path, hparams, model)
    return model


COMPACT = {"vocab_ids": (3, 17, 256, 1000, 42_000, EOT)}  # the demo's kind of LM


@pytest.mark.parametrize("lm_overrides", [{}, COMPACT])
def test_caption_export_reads_back_identical(tmp_path, lm_overrides):
    model = tiny_caption_checkpoint(
        tmp_path / "c.ckpt", {"ckpt": "/elsewhere/stage1/last.ckpt"}, **lm_overrides
    )
    assert export_checkpoint(tmp_path / "c.ckpt", tmp_path / "out") == CAPTION
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    umask = os.umask(0)
    os.umask(umask)
    # not mkdtemp's private 0600/0700: the umask's modes, like any file the user writes
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in (tmp_path / "out").iterdir())
    config = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    # plain data, no optimizer, no pointer to the stage-1 file the weights came from
    fields = dataclasses.asdict(lm_config({"name": "tiny", **lm_overrides}))
    assert config["lm"] == {"config": json.loads(json.dumps(fields))}
    assert config["generation"] == {"max_new_tokens": 7, "num_beams": 2} and "optim" not in config

    loaded, hparams = load_captioner(tmp_path / "out")
    assert (
        not loaded.training
        and hparams["cross_every"] == 1
        and hparams["trainable"] == ["xattn", "projection"]
    )
    assert loaded.lm.lm_head.weight is loaded.lm.transformer.wte.weight  # still tied
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(0, N_VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, pixel_values=pixels)[0], model(ids, pixel_values=pixels)[0], atol=0, rtol=0
        )
    for method in ({"method": "greedy"}, {"method": "beam", "num_beams": 2}):
        ours = model.caption(pixels, max_new_tokens=6, **method)
        assert loaded.caption(pixels, max_new_tokens=6, **method) == ours


def test_load_captioner_explains_directories_it_cannot_read(tmp_path, lm_export):
    _, hf_dir = lm_export
    with pytest.raises(UserError, match=r"no captioner\.json.*transformers model"):
        load_captioner(hf_dir)
    (tmp_path / CONFIG_FILE).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a captioner config"):
        load_captioner(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_captioner(tmp_path)


def test_export_refuses_a_non_empty_destination_unless_forced(tmp_path):
    tiny_caption_checkpoint(tmp_path / "c.ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty; pass --force"):
        export_checkpoint(tmp_path / "c.ckpt", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="would delete the checkpoint"):
        export_checkpoint(tmp_path / "c.ckpt", tmp_path, force=True)
    export_checkpoint(tmp_path / "c.ckpt", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt", "out"]  # no temp dirs left behind


def test_fresh_directory_leaves_the_destination_alone_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"), fresh_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("half-way")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_tells_what_a_file_is_not(tmp_path):
    torch.save({"hyper_parameters": {"lr": 0.1}, "state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="neither a stage-1 nor a caption checkpoint"):
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "out")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"not a checkpoint we can read .*formats read: .*build-nanogpt"):
        export_checkpoint(tmp_path / "notes.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
