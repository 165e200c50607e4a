"""The output layer fused with its cross-entropy equals F.linear + F.cross_entropy, chunk by chunk."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from captioner.models.loss import linear_cross_entropy


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(100, 32, generator=g, requires_grad=True)
    w = torch.randn(97, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 97, (100,), generator=g)
    t[::7] = -100  # ignored rows, as padding
    return x, w, t


@pytest.mark.parametrize("chunk_rows", [1, 16, 100, 4096])
def test_loss_and_gradients_equal_the_unfused_layer(chunk_rows):
    x, w, t = inputs()
    ref = F.cross_entropy(F.linear(x, w), t)
    (3 * ref).backward()  # an upstream gradient other than 1 must scale the handed-back gradients
    ref_x, ref_w = x.grad, w.grad
    x, w, t = inputs()
    out = linear_cross_entropy(x, w, t, chunk_rows=chunk_rows)
    (3 * out).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_x)
    torch.testing.assert_close(w.grad, ref_w)


def test_without_gradients_and_under_bf16_autocast():
    x, w, t = inputs()
    with torch.no_grad():
        ref = F.cross_entropy(F.linear(x, w), t)
        torch.testing.assert_close(linear_cross_entropy(x, w, t, chunk_rows=8), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(x, w), t)
        out = linear_cross_entropy(x, w, t, chunk_rows=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=2e-2, atol=2e-2)
    out.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_bf16_gradients_match_the_unfused_layer_under_autocast():
    grads = []
    for fn in (lambda x, w, t: F.cross_entropy(F.linear(x, w), t), linear_cross_entropy):
        x, w, t = inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(x, w, t).backward()
        grads.append((x.grad, w.grad))
    (ref_x, ref_w), (x_grad, w_grad) = grads
    # bf16 rounds where the two apply the 1/count scale differently: agreement to bf16's precision
    torch.testing.assert_close(x_grad, ref_x, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(w_grad, ref_w, rtol=2e-2, atol=1e-3)
    # one bf16-rounded 1/count would scale every gradient by the same wrong factor; the means must agree closely
    assert abs(x_grad.abs().mean() / ref_x.abs().mean() - 1) < 2e-3


def test_every_row_ignored_gives_zero_loss_and_gradients():
    x, w, t = inputs()
    t[:] = -100
    out = linear_cross_entropy(x, w, t, chunk_rows=16)
    out.backward()
    assert out.item() == 0 and not x.grad.any() and not w.grad.any()


def test_a_frozen_output_layer_gets_no_gradient():
    x, w, t = inputs()
    w.requires_grad_(False)
    linear_cross_entropy(x, w, t).backward()
    assert w.grad is None and x.grad is not None


def matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_grad_mode_only_the_forward_matmul_runs(mode):
    """requires_grad inputs under no_grad/inference_mode (validation): the loss of grad mode, bit for bit, for
    the FLOPs of the logits alone (2·N·C·V), not those of the two gradients too."""
    x, w, t = inputs()
    forward_flops = 2 * x.size(0) * x.size(1) * w.size(0)
    grad_loss = linear_cross_entropy(x, w, t, chunk_rows=16)
    assert matmul_flops(lambda: linear_cross_entropy(x, w, t, chunk_rows=16)) == 3 * forward_flops
    with mode():
        assert matmul_flops(lambda: linear_cross_entropy(x, w, t, chunk_rows=16)) == forward_flops
        loss = linear_cross_entropy(x, w, t, chunk_rows=16)
    assert torch.equal(loss, grad_loss.detach()) and not loss.requires_grad
    x.requires_grad_(False)
    w.requires_grad_(False)
    assert matmul_flops(lambda: linear_cross_entropy(x, w, t, chunk_rows=16)) == forward_flops
