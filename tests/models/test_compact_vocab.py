"""GPT-2 over a compact vocabulary: the full model restricted to the listed ids, GPT-2's init and RNG stream, the
configs that select it, and checkpoints written while it lived inside GPTConfig."""

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F

from captioner.errors import UserError
from captioner.models.compact_vocab import CompactVocabConfig, CompactVocabGPT, build_lm, lm_config
from captioner.models.gpt import GPT, GPTConfig, read_lm_checkpoint
from captioner.tokenizer import EOT, N_VOCAB

IDS = (3, 17, 256, 1000, 42_000, EOT)
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


def test_the_full_model_with_the_other_ids_impossible():
    """Its rows are the full model's rows of the listed ids: the same logits on them, probability 0 elsewhere,
    so the loss is the full model's over the listed ids; the fused loss and its gradients match the plain one."""
    torch.manual_seed(0)
    full = GPT(GPTConfig(**SHAPE, vocab_size=50304))
    part = CompactVocabGPT(CompactVocabConfig(**SHAPE, vocab_ids=IDS))
    assert part.config.vocab_size == len(IDS) and part.lm_head.weight is part.transformer.wte.weight
    sd = full.state_dict()
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = sd["lm_head.weight"][list(IDS)]
    part.load_state_dict(sd)  # the same keys as GPT-2's: only the token rows differ
    ids = torch.tensor(IDS)
    idx = ids[torch.randint(0, len(IDS), (2, 16))]
    targets = ids[torch.randint(0, len(IDS), (2, 16))]
    targets[0, :3] = -100

    logits, loss = part(idx, targets)
    ref_logits = full(idx)[0][..., :N_VOCAB]
    assert logits.shape == (2, 16, N_VOCAB)  # over GPT-2's ids, as callers index them
    torch.testing.assert_close(logits[..., ids], ref_logits[..., ids])
    listed = torch.zeros(N_VOCAB, dtype=torch.bool)
    listed[ids] = True
    assert (logits[..., ~listed] == torch.finfo(logits.dtype).min).all()  # probability 0
    masked = ref_logits.masked_fill(~listed, float("-inf"))
    ref_loss = F.cross_entropy(masked.reshape(-1, N_VOCAB), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref_loss)

    grads = {}
    for fused in (False, True):
        part.zero_grad()
        _, loss = part(idx, targets, return_logits=not fused)
        loss.backward()
        grads[fused] = [p.grad.clone() for p in part.parameters()]
        torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_ids_read_as_eot_and_are_refused_as_targets():
    torch.manual_seed(0)
    model = CompactVocabGPT(CompactVocabConfig.named("tiny", vocab_ids=IDS)).eval()
    idx = torch.tensor([[3, 17, 99, 256]])  # 99 is not listed
    logits, _ = model(idx)
    torch.testing.assert_close(logits, model(torch.tensor([[3, 17, EOT, 256]]))[0])
    targets = torch.tensor([[17, 256, 1000, 99]])
    _, loss = model(idx, targets)
    assert loss > 1e37  # probability 0: -log p is as large as the dtype goes
    with pytest.raises((IndexError, RuntimeError)):  # the fused loss will not train on an id it cannot write
        model(idx, targets, return_logits=False)


def test_init_is_gpt2s_over_the_rows_with_its_own_token_embedding_std():
    """The same random draws, in the same order, as GPT-2 with one token per listed id (demo runs repeat
    bit for bit): at wte_std 0.02 the very same weights; at 0.5 only the tied embedding differs, by 25x."""
    plain = GPTConfig(**SHAPE, vocab_size=len(IDS))
    torch.manual_seed(0)
    reference = GPT(plain).state_dict()
    after_reference = torch.get_rng_state()
    for std in (0.02, 0.5):
        torch.manual_seed(0)
        model = CompactVocabGPT(CompactVocabConfig(**SHAPE, vocab_ids=IDS, wte_std=std))
        assert torch.equal(torch.get_rng_state(), after_reference)
        for key, value in model.state_dict().items():
            if std == 0.02 or key not in ("transformer.wte.weight", "lm_head.weight"):
                assert torch.equal(value, reference[key]), key
            else:
                torch.testing.assert_close(value, reference[key] * 25)


def test_config(tmp_path):
    config = CompactVocabConfig.named("tiny", vocab_ids=[EOT, 5, 3])
    assert config.vocab_ids == (3, 5, EOT) and config.vocab_size == 3  # sorted, a tuple; one row each
    path = tmp_path / "vocab_ids.json"
    path.write_text(json.dumps([EOT, 9, 4]))
    config = lm_config({"name": "tiny", "vocab_ids": str(path), "wte_std": 0.5})
    assert isinstance(config, CompactVocabConfig)
    assert (config.vocab_ids, config.vocab_size, config.wte_std, config.n_layer) == ((4, 9, EOT), 3, 0.5, 2)
    assert lm_config(dataclasses.asdict(config)) == config  # how checkpoints rebuild it
    for bad, message in [
        ([5, 3], "must include <|endoftext|>"),
        ([EOT, 3, 3], "lists a token id twice"),
        ([EOT, 60_000], r"distinct GPT-2 token ids in \[0, 50257\), got \[60000\]"),
        ([], "got an empty list"),
        ([EOT, "a"], "got \\['a'\\]"),
        (7, "must be a list of token ids or a JSON file, got 7"),
    ]:
        with pytest.raises(UserError, match=re.escape(message) if "<" in message else message):
            CompactVocabConfig.named("tiny", vocab_ids=bad)
    with pytest.raises(UserError, match=r"vocab_ids file not found: .*nope.json .*captioner-prepare shapes"):
        lm_config({"name": "tiny", "vocab_ids": str(tmp_path / "nope.json")})
    path.write_text('{"ids": [1]}')
    with pytest.raises(UserError, match="expected a JSON list of token ids, got dict"):
        lm_config({"name": "tiny", "vocab_ids": str(path)})
    for std in (0, -1.0, True, "0.5"):
        with pytest.raises(UserError, match=r"CompactVocabConfig\.wte_std must be a positive number"):
            CompactVocabConfig.named("tiny", vocab_ids=IDS, wte_std=std)


def test_vocab_ids_select_the_kind_and_the_gpt2_keys_of_older_checkpoints_read_as_gpt2():
    assert lm_config("tiny") == GPTConfig.named("tiny") and type(lm_config("tiny")) is GPTConfig
    # what experiment configs and checkpoints of a GPT-2 held from 2026-12-02 to 2026-12-06
    legacy = {**dataclasses.asdict(GPTConfig.named("tiny")), "vocab_ids": None, "wte_std": 0.02}
    assert type(lm_config(legacy)) is GPTConfig and lm_config(legacy) == GPTConfig.named("tiny")
    assert type(build_lm(lm_config(legacy))) is GPT
    assert type(build_lm(lm_config({"name": "tiny", "vocab_ids": IDS}))) is CompactVocabGPT
    with pytest.raises(
        UserError, match=r"model\.gpt: wte_std belongs to a compact vocabulary: it needs vocab_ids"
    ):
        lm_config({"name": "tiny", "wte_std": 0.5})
    with pytest.raises(UserError, match=r"run.ckpt: CompactVocabConfig has no fields \['dropout'\]"):
        lm_config({"name": "tiny", "vocab_ids": IDS, "dropout": 0.1}, "run.ckpt")


def test_a_checkpoint_in_the_layout_before_compact_vocab_existed_loads(tmp_path):
    """Demo checkpoints written while vocab_ids lived in GPTConfig: vocab_size 50,304 beside the 65 ids."""
    torch.manual_seed(0)
    model = build_lm(CompactVocabConfig(**SHAPE, vocab_ids=IDS, wte_std=0.5)).eval()
    fields = {**SHAPE, "vocab_size": 50304, "vocab_ids": list(IDS), "wte_std": 0.5}
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"hyper_parameters": {"gpt": fields}, "state_dict": state}, tmp_path / "last.ckpt")

    fields, weights = read_lm_checkpoint(tmp_path / "last.ckpt")
    loaded = build_lm(lm_config(fields, tmp_path / "last.ckpt"), weights).eval()
    assert isinstance(loaded, CompactVocabGPT) and loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.tensor(IDS)[torch.randint(0, len(IDS), (2, 9))]
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)
