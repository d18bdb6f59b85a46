"""grouped_layernorm2d's autograd formula, for the Triton (``moce_triton::``) ops (and a compiled
binding, should one come): gradients of x, weight, bias (in bias's own dtype) and the optional
gate (``LN(x) * gate``); ``mean`` and ``rstd`` are by-products for the backward, not
differentiable outputs; the offsets, channel counts and eps are not differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, weight, bias, offsets, channels, _eps, gate = inputs
    _y, mean, rstd = output
    # The gate's gradient is grad y * LN(x): the bias is needed then (and only then).
    ctx.has_gate = gate is not None
    extra = (gate, bias) if ctx.has_gate else ()
    ctx.save_for_backward(x, weight, offsets, mean, rstd, *extra)
    ctx.channels = list(channels)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def make_backward(grouped_layernorm2d_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``grouped_layernorm2d_bwd``."""

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, offsets, mean, rstd, *extra = ctx.saved_tensors
        gate, bias = extra if ctx.has_gate else (None, None)
        grad_x, grad_weight, grad_bias, grad_gate = grouped_layernorm2d_bwd(
            grad_y.contiguous(), x, weight, offsets, mean, rstd, ctx.channels, gate, bias
        )
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None,
            None,
            None,
            None,
            grad_gate if ctx.has_gate and ctx.needs_input_grad[6] else None,
        )

    return backward
