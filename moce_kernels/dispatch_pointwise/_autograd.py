"""dispatch_pointwise's autograd formula, for the Triton (``moce_triton::``) ops: gradients of x,
weight and bias (in bias's own dtype); the plan's tensors and the widths are not differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, weight, bias, offsets, sorted_images, inverse, in_channels, out_channels = inputs
    ctx.save_for_backward(x, weight, offsets, sorted_images, inverse)
    ctx.ints = (list(in_channels), list(out_channels))
    ctx.bias_dtype = None if bias is None else bias.dtype


def make_backward(op_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling the backward op ``op_bwd``."""

    def backward(ctx, grad_y):
        x, weight, offsets, sorted_images, inverse = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = op_bwd(
            grad_y.contiguous(), x, weight, offsets, sorted_images, inverse, *ctx.ints
        )
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias and ctx.bias_dtype is not None else None,
            None,
            None,
            None,
            None,
            None,
        )

    return backward
