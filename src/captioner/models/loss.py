"""The output layer and its cross-entropy in one step, a chunk of rows at a time (as Liger's fused linear
cross-entropy): the (rows, V) logits, and their fp32 copy that autocast makes for the softmax, never exist whole.

For GPT-2 124M at micro-batch 16 × 1024 that is 8,192 × 50,304 logits per 8K rows, instead of 3.3 GB of bf16
logits + 6.6 GB fp32 at once. The gradients of the hidden states and of the output weights are computed in the
forward pass, chunk by chunk, and handed back in backward (scaled by the incoming gradient), so nothing is
recomputed: the same matmuls as the unfused layer, in a different order. Without grad mode (validation, no_grad,
inference_mode) or with nothing requiring grad, only the forward matmul runs.

Shapes: N rows, C n_embd, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 8192


def _loss_and_grads(x, weight, targets, chunk_rows, grad_x_needed, grad_w_needed):
    """(mean loss, its gradient for x or None, for weight or None), a chunk of rows at a time."""
    valid = targets != -100  # (N,)
    count = valid.sum().clamp(min=1)  # a tensor: no host sync
    scale = valid / count  # (N,) float32: each row's share of the mean, 0 where ignored
    loss = x.new_zeros((), dtype=torch.float32)
    grad_x = torch.empty_like(x) if grad_x_needed else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if grad_w_needed else None
    w = weight.to(x.dtype)  # (V, C) autocast's copy, once
    for start in range(0, x.size(0), chunk_rows):
        rows = slice(start, start + chunk_rows)
        xc, tc, sc = x[rows], targets[rows].clamp(min=0)[:, None], scale[rows, None]  # (n, C), (n, 1), (n, 1)
        # log_softmax is one fused kernel; its output, exponentiated in place, is the softmax the gradient needs:
        # two passes over the (n, V) logits in all
        # (dtype=float32 lets CUDA read half-precision logits directly instead of copying them to float first)
        logp = torch.log_softmax(xc @ w.t(), dim=-1, dtype=torch.float32)  # (n, V) this chunk only
        loss = loss - (logp.gather(1, tc) * sc).sum()
        if grad_x_needed or grad_w_needed:
            # d(mean loss)/d(logits) = (softmax - one_hot) * scale; the scale is applied to the (n, C) side of
            # each matmul below, not to the (n, V) gradient
            grad = logp.exp_().scatter_add_(1, tc, logp.new_full(tc.shape, -1.0)).to(xc.dtype)  # (n, V)
            if grad_x_needed:
                grad_x[rows] = (grad @ w).float() * sc  # (n, C)
            if grad_w_needed:
                grad_w += (grad.t() @ (xc.float() * sc).to(xc.dtype)).float()  # (V, C)
    return loss, grad_x, None if grad_w is None else grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        # a frozen output layer (caption runs) needs no grad_w
        loss, grad_x, grad_w = _loss_and_grads(x, weight, targets, chunk_rows, *ctx.needs_input_grad[:2])
        ctx.grads = (grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.grads
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_x), scale(grad_w), None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """mean cross-entropy of `x @ weight.T` (N, V) against targets (N,), -100 ignored: equal to
    `F.cross_entropy(F.linear(x, weight), targets)` without holding all the logits. x (N, C), weight (V, C).
    Under torch.compile the plain expression is traced instead: inductor fuses the cast and the softmax itself."""
    if torch.compiler.is_compiling():
        return F.cross_entropy(F.linear(x, weight), targets, ignore_index=-100)
    if torch.is_autocast_enabled(x.device.type):  # compute in autocast's dtype, as F.linear would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows)
        # needs_input_grad follows requires_grad, not grad mode: under no_grad/inference_mode (validation)
        # the Function would still compute both gradients; this is the forward alone
        loss, _, _ = _loss_and_grads(x, weight, targets, chunk_rows, False, False)
        return loss
