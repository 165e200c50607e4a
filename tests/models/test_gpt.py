"""GPT-2 model: init, weight tying, parity with transformers, KV cache, cross-attention slots, loading."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from captioner.errors import UserError
from captioner.models import generate as decoding
from captioner.models.gpt import GPT, GPTConfig, KVCache, read_lm_checkpoint


def small(**overrides) -> GPTConfig:
    # a small vocab keeps these tests fast; the named configs are checked separately
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=97), **overrides})


class AddContext(nn.Module):
    """A stand-in cross layer: adds a per-layer scaled mean of the context, records how it was called."""

    def __init__(self, i: int):
        super().__init__()
        self.i = i
        self.scale = nn.Parameter(torch.tensor(0.1 * (i + 1)))
        self.calls = []

    def forward(self, x, context, cache=None, layer=None):
        self.calls.append(layer)
        return x + self.scale * context.mean(dim=1, keepdim=True)


def test_named_configs_and_hydra_dicts():
    c = GPTConfig.named("gpt2_124m")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (12, 12, 768, 1024, 50304)
    assert GPTConfig.named("gpt2").vocab_size == 50257
    assert GPTConfig.named("demo", n_layer=3).n_layer == 3
    assert GPTConfig.named("tiny") == GPTConfig(**dataclasses.asdict(GPTConfig.named("tiny")))
    with pytest.raises(ValueError, match=r"unknown GPT config name 'gpt5'.*gpt2_124m"):
        GPTConfig.named("gpt5")
    assert GPTConfig.resolve({"name": "tiny", "n_layer": 3}) == GPTConfig.named("tiny", n_layer=3)
    assert GPTConfig.resolve(dataclasses.asdict(small())) == small()
    with pytest.raises(UserError, match=r"model.gpt: GPTConfig has no fields \['n_layers'\]"):
        GPTConfig.resolve({"name": "tiny", "n_layers": 3}, "model.gpt")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_head=3), r"n_embd \(32\) must be divisible by GPTConfig.n_head \(3\)"),
        (dict(n_layer=0), "GPTConfig.n_layer must be a positive integer, got 0"),
        (dict(vocab_size=-5), "GPTConfig.vocab_size must be a positive integer, got -5"),
        (dict(block_size="64"), "GPTConfig.block_size must be a positive integer, got '64'"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        small(**overrides)


def test_init_statistics_and_tied_weights():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=4096))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.03)
    residual = 0.02 * (2 * 8) ** -0.5
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual, rel=0.03)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.03)
    assert torch.count_nonzero(block.mlp.c_fc.bias) == 0
    # counted once even though tied; wpe left out by default
    n_all = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == n_all
    assert model.num_params() == n_all - 64 * 256
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 8 * 4 * 64 * 64


def test_logits_match_transformers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    hf = GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF inits biases and LayerNorms trivially; randomise them so the mapping is tested
        for name, p in hf.named_parameters():
            if not name.endswith("wte.weight"):
                p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)

    model = GPT.from_pretrained(tmp_path)
    assert model.config == GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(0, 50257, (2, 17))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == (2, 17, 50257)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_loss_ignores_padding():
    model = GPT(small())
    idx = torch.randint(0, 97, (2, 12))
    targets = torch.randint(0, 97, (2, 12))
    targets[1, 5:] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    assert logits.shape == (2, 12, 97)


def test_loss_without_logits_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(small())
    idx = torch.randint(0, 97, (3, 12))
    targets = torch.randint(0, 97, (3, 12))
    targets[1, 5:] = -100
    targets[2, 9:] = -100
    _, loss = model(idx, targets)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    none, loss_only = model(idx, targets, return_logits=False)
    loss_only.backward()
    assert none is None
    torch.testing.assert_close(loss_only, loss)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(small(block_size=8))
    with pytest.raises(ValueError, match="length 9 exceeds the model's block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = KVCache(8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="length 9 exceeds"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    cache = KVCache(7)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"KVCache holds 7 positions; 6 \+ 2 do not fit"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("with_cross", [False, True])
def test_kv_cache_incremental_equals_full_forward(with_cross):
    torch.manual_seed(0)
    model = GPT(small(n_layer=4)).eval()
    context = None
    if with_cross:
        model.insert_cross_attention(2, AddContext)
        context = torch.randn(3, 5, 32)
    idx = torch.randint(0, 97, (3, 14))
    with torch.no_grad():
        full, _ = model(idx, context=context)
        cache = KVCache(16)
        # prefill of 5, a chunk of 4 (T > 1 on a non-empty cache), then single tokens
        parts = [model(idx[:, :5], context=context, cache=cache)[0]]
        buffers = [t.data_ptr() for kv in cache.self_attn.values() for t in kv]
        parts.append(model(idx[:, 5:9], context=context, cache=cache)[0])
        for t in range(9, 14):
            parts.append(model(idx[:, t : t + 1], context=context, cache=cache)[0])
    assert (cache.length, int(cache.position)) == (14, 14)
    assert cache.self_attn[0][0].shape == (3, 2, 16, 16)  # (rows, nh, max_length, hs), allocated once
    assert [t.data_ptr() for kv in cache.self_attn.values() for t in kv] == buffers  # written in place
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_reset_reuses_its_buffers_for_a_new_batch():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    cache = KVCache(10)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 9)), cache=cache)  # leaves stale keys at every position
        buffers = [t.data_ptr() for kv in cache.self_attn.values() for t in kv]
        cache.reset()
        idx = torch.randint(0, 97, (2, 6))
        steps = [model(idx[:, :3], cache=cache)[0]] + [
            model(idx[:, t : t + 1], cache=cache)[0] for t in (3, 4, 5)
        ]
        full, _ = model(idx)
    assert [t.data_ptr() for kv in cache.self_attn.values() for t in kv] == buffers
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_reorder_selects_batch_rows():
    cache = KVCache(4)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 8)
    positions = torch.arange(4)
    cache.write(0, k, k + 10, positions)
    buf_k, buf_v = cache.self_attn[0]
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.self_attn[0][0] is buf_k and cache.self_attn[0][1] is buf_v  # in place: same addresses
    assert buf_k[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert buf_v[:, 0, 3, 0].tolist() == [12.0, 12.0, 10.0]


def test_packed_documents_score_as_if_alone():
    """Two documents in one row, each with its own positions and a block-diagonal causal mask, give the hidden
    states each gets alone (what HellaSwag packing relies on)."""
    torch.manual_seed(0)
    model = GPT(small()).eval()
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    doc = torch.tensor([0] * 5 + [1] * 7)
    positions = torch.cat([torch.arange(5), torch.arange(7)])
    mask = (doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    with torch.no_grad():
        packed = model.hidden_states(torch.cat([a, b], dim=1), positions=positions, attn_mask=mask)
        alone = torch.cat([model.hidden_states(a), model.hidden_states(b)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("n_layer", "every", "blocks"), [(4, 1, [0, 1, 2, 3]), (4, 2, [1, 3]), (8, 4, [3, 7])]
)
def test_cross_attention_slots(n_layer, every, blocks):
    model = GPT(small(n_layer=n_layer))
    plain_keys = set(model.state_dict())
    model.insert_cross_attention(every, AddContext)
    assert sorted(int(k) for k in model.cross) == blocks
    assert all(model.cross[str(i)].i == i for i in blocks)
    # GPT-2's own keys are untouched: a stage-1 state dict loads with only cross.* missing
    assert {k for k in model.state_dict() if not k.startswith("cross.")} == plain_keys
    lm_only = GPT(small(n_layer=n_layer)).state_dict()
    result = model.load_state_dict(lm_only, strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("cross.") for k in result.missing_keys)
    model(torch.zeros(1, 4, dtype=torch.long), context=torch.randn(1, 3, 32))
    assert [model.cross[str(i)].calls for i in blocks] == [[i] for i in blocks]
    model(torch.zeros(1, 4, dtype=torch.long))  # no context: cross layers are skipped
    assert [len(model.cross[str(i)].calls) for i in blocks] == [1] * len(blocks)


def test_gpt2_124m_every_2_gets_6_cross_layers():
    # the 124M shape without building its 124M parameters: count the slots on a narrow 12-layer model
    model = GPT(small(n_layer=12, n_embd=8))
    model.insert_cross_attention(2, AddContext)
    assert sorted(int(k) for k in model.cross) == [1, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="positive integer, got 0"):
        model.insert_cross_attention(0, AddContext)


@pytest.mark.parametrize(
    "key", ["gpt", "model"]
)  # "model": checkpoints written before the package's 0.2 layout
def test_read_lm_checkpoint(tmp_path, key):
    torch.manual_seed(0)
    config = small()
    lm = GPT(config)
    state = {f"model._orig_mod.{k}": v for k, v in lm.state_dict().items()}
    state["other.weight"] = torch.zeros(2)  # other LightningModule attributes are ignored
    ckpt = {"hyper_parameters": {key: dataclasses.asdict(config), "compile": True}, "state_dict": state}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)

    fields, weights = read_lm_checkpoint(path)
    assert fields == dataclasses.asdict(config)
    loaded = GPT(GPTConfig.resolve(fields))
    loaded.load_state_dict(weights)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(loaded(idx)[0], lm(idx)[0], atol=0, rtol=0)

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(UserError, match=r"bad.ckpt: not a stage-1 checkpoint.*hyper_parameters"):
        read_lm_checkpoint(bad)
    torch.save({**ckpt, "hyper_parameters": {"model": {**dataclasses.asdict(config), "dropout": 0.1}}}, bad)
    with pytest.raises(
        UserError, match=r"bad.ckpt: GPTConfig has no fields \['dropout'\] \(its fields: \['block"
    ):
        GPTConfig.resolve(read_lm_checkpoint(bad)[0], bad)


def test_seeded_sampling_repeats():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    idx = torch.randint(0, 97, (2, 3))

    def sample(seed):
        pick = decoding.sampler(top_k=5, generator=torch.Generator().manual_seed(seed))
        return decoding.decode_loop(model, idx, pick, max_new_tokens=6, n_vocab=97)

    out = sample(1)
    assert out.shape == (2, 6) and torch.equal(out, sample(1))
