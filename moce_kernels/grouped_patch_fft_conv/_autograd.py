"""grouped_patch_fft_conv's autograd formula, for the Triton (``moce_triton::``) ops: gradients of
q and k (the correlations of the output's gradient with k and with q); the offsets, widths and
patch sizes are not differentiable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    q, k, offsets, channels, patch_sizes = inputs
    ctx.save_for_backward(q, k, offsets)
    ctx.channels, ctx.patch_sizes = list(channels), list(patch_sizes)


def make_backward(bwd_op: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``bwd_op``."""

    def backward(ctx, grad_out):
        q, k, offsets = ctx.saved_tensors
        grad_q, grad_k = bwd_op(grad_out.contiguous(), q, k, offsets, ctx.channels, ctx.patch_sizes)
        need_q, need_k = ctx.needs_input_grad[:2]
        return (grad_q if need_q else None, grad_k if need_k else None, None, None, None)

    return backward
