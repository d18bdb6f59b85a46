"""grouped_layernorm2d's autograd formula, for the Triton (``moce_triton::``) ops (and a compiled
binding, should one come): gradients of x, weight and bias (in bias's own dtype); ``mean`` and
``rstd`` are by-products for the backward, not differentiable outputs; the offsets, channel
counts and eps are not differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, weight, bias, offsets, channels, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, offsets, mean, rstd)
    ctx.channels = list(channels)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def make_backward(grouped_layernorm2d_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``grouped_layernorm2d_bwd``."""

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, offsets, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = grouped_layernorm2d_bwd(
            grad_y.contiguous(), x, weight, offsets, mean, rstd, ctx.channels
        )
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None,
            None,
            None,
            None,
        )

    return backward
