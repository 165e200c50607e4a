"""The non-finite guard (training/base.py): a bad step never reaches weights or AdamW state, is counted, and K in a
row stop the run; with a fused AdamW the skip happens on the device (no host read of the verdict)."""

from __future__ import annotations

import pytest
import torch

from captioner.training.base import DivergedError
from captioner.training.pretrain import PretrainModule

pytestmark = pytest.mark.filterwarnings("ignore:.*self.trainer.*reference")  # no Trainer: nothing is logged


def make(fused: bool, max_skipped_steps: int = 2):
    torch.manual_seed(0)
    module = PretrainModule(gpt="tiny", optim={"max_skipped_steps": max_skipped_steps})
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, fused=fused)
    return module, optimizer


def step(module, optimizer, poison: bool) -> None:
    """One optimizer step as Lightning runs it: micro-batch, then the hooks before optimizer.step()."""
    x = torch.randint(0, 100, (2, 8))
    _, loss = module.model(x, x)
    if poison:
        loss = loss * float("nan")
    loss.backward()
    module.accumulate_loss(loss, x.numel())
    module.on_before_optimizer_step(optimizer)
    module.configure_gradient_clipping(optimizer, 1.0)
    optimizer.step()
    optimizer.zero_grad()


def snapshot(module, optimizer):
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return weights, state


@pytest.mark.parametrize("fused", [False, True])
def test_a_nonfinite_step_leaves_weights_and_moments_and_is_counted(fused):
    module, optimizer = make(fused)
    step(module, optimizer, poison=False)
    before = snapshot(module, optimizer)
    step(module, optimizer, poison=True)
    weights, state = snapshot(module, optimizer)
    assert all(torch.equal(weights[k], v) for k, v in before[0].items())
    assert all(
        torch.equal(state[p][k], v) for p, s in before[1].items() for k, v in s.items()
    )  # step count too
    assert (module._skipped_total, module._skipped_in_a_row) == (1, 1)
    step(module, optimizer, poison=False)  # a good step moves the weights again and resets the streak
    assert not torch.equal(module.state_dict()["model.lm_head.weight"], weights["model.lm_head.weight"])
    assert (module._skipped_total, module._skipped_in_a_row) == (1, 0)


@pytest.mark.parametrize("fused", [False, True])
def test_max_skipped_steps_in_a_row_stop_the_run_naming_the_step(fused):
    module, optimizer = make(fused, max_skipped_steps=2)
    step(module, optimizer, poison=True)
    with pytest.raises(DivergedError, match=r"step \d+: .*not finite for 2 optimizer steps in a row"):
        step(module, optimizer, poison=True)
        module.on_train_end()  # a fused step's verdict may be counted one step later (at the latest, here)


def test_the_fused_guard_hands_the_verdict_to_the_optimizer_as_a_tensor():
    module, optimizer = make(fused=True)
    step(module, optimizer, poison=True)
    assert isinstance(optimizer.found_inf, torch.Tensor) and float(optimizer.found_inf) == 1.0
    step(module, optimizer, poison=False)
    assert float(optimizer.found_inf) == 0.0
