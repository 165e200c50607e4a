import itertools
import math

import pytest
import torch

from captioner.models.captioner import GatedCrossAttention
from captioner.optim import (
    make_adamw,
    param_groups,
    warmup_cosine,
    warmup_cosine_schedule,
    weights_fingerprint,
)


def test_schedule_matches_build_nanogpt_get_lr():
    max_lr, min_lr, warmup, max_steps = 6e-4, 6e-5, 715, 19073

    def get_lr(it):  # build-nanogpt, verbatim semantics
        if it < warmup:
            return max_lr * (it + 1) / warmup
        if it > max_steps:
            return min_lr
        ratio = (it - warmup) / (max_steps - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)

    for it in [0, 1, 100, 714, 715, 716, 5000, 10000, 19072, 19073, 25000]:
        assert max_lr * warmup_cosine(it, warmup_steps=warmup, max_steps=max_steps) == pytest.approx(
            get_lr(it)
        )


def test_scheduler_steps_per_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    cfg = warmup_cosine_schedule(opt, warmup_steps=4, max_steps=10, min_lr_ratio=0.1)
    assert cfg["interval"] == "step"
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cfg["scheduler"].step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))


def test_decay_only_on_matrices_and_frozen_params_excluded():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1, lr=1e-3)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 4  # two biases + LayerNorm weight and bias
    opt = make_adamw(model, lr=1e-3)
    assert opt.defaults["fused"]  # one device kind with a fused kernel (here the CPU)


def test_gates_get_their_own_lr_and_no_decay():
    layer = GatedCrossAttention(8, 2)
    groups = param_groups(layer, weight_decay=0.1, lr=1e-3, gate_lr_mult=10.0)
    gate_group = groups[-1]
    assert len(gate_group["params"]) == 2 and gate_group["lr"] == pytest.approx(1e-2)
    assert gate_group["weight_decay"] == 0.0


def test_nothing_trainable_is_a_clear_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1, 1e-3)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def test_fingerprint_sees_a_permutation_and_a_one_element_change():
    model = _mlp()
    before = weights_fingerprint(model)
    with torch.no_grad():
        w = model[0].weight
        w.copy_(w.flatten()[torch.randperm(w.numel())].view_as(w))  # same sum and |sum|, other weights
    permuted = weights_fingerprint(model)
    with torch.no_grad():
        model[2].bias[1] = torch.nextafter(model[2].bias[1], torch.tensor(math.inf))  # one ulp
    nudged = weights_fingerprint(model)
    assert len({before, permuted, nudged}) == 3


def test_fingerprint_sees_values_swapped_between_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    before = weights_fingerprint(model)
    with torch.no_grad():
        a = model[0].weight.clone()
        model[0].weight.copy_(model[1].weight)
        model[1].weight.copy_(a)
    assert weights_fingerprint(model) != before


def test_fingerprint_of_equal_weights_is_equal_in_their_stored_dtype():
    assert weights_fingerprint(_mlp(0)) == weights_fingerprint(_mlp(0)) != weights_fingerprint(_mlp(1))
    # bf16 has no numpy dtype: the bytes are read as they are stored.
    assert weights_fingerprint(_mlp(0).bfloat16()) == weights_fingerprint(_mlp(0).bfloat16())
    assert weights_fingerprint(_mlp(0).bfloat16()) != weights_fingerprint(_mlp(0))


def test_fingerprint_ignores_memory_layout():
    model, copy = _mlp(), _mlp()
    with torch.no_grad():
        # A transposed view holds the same values in another layout, as a state_dict entry may.
        copy[0].weight = torch.nn.Parameter(model[0].weight.t().contiguous().t())
    assert not copy[0].weight.is_contiguous()
    assert weights_fingerprint(copy) == weights_fingerprint(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fingerprint_ignores_the_device():
    assert weights_fingerprint(_mlp().cuda()) == weights_fingerprint(_mlp())
