import itertools
import math

import pytest
import torch

from captioner.models.captioner import GatedCrossAttention
from captioner.optim import make_adamw, param_groups, warmup_cosine, warmup_cosine_schedule


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
