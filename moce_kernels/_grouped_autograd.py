"""The autograd formula of the grouped ops whose forward is ``op(x, weight, bias, offsets,
*indices, ints_a, ints_b)`` and whose backward op is ``op_bwd(grad_y, x, weight, offsets,
*indices, ints_a, ints_b) -> (grad_x, grad_weight, grad_bias)`` (grouped_dwconv,
grouped_pointwise; dispatch_pointwise, whose ``indices`` are the plan's sorted images and inverse):
gradients of x, weight and bias (in bias's own dtype); the offsets, the index tensors and the
per-expert integers are not differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, weight, bias, offsets, *indices, ints_a, ints_b = inputs
    ctx.save_for_backward(x, weight, offsets, *indices)
    ctx.ints = (list(ints_a), list(ints_b))
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.num_inputs = len(inputs)


def make_backward(op_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``op_bwd`` (a compiled or Triton backward op)."""

    def backward(ctx, grad_y):
        grad_x, grad_weight, grad_bias = op_bwd(grad_y.contiguous(), *ctx.saved_tensors, *ctx.ints)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias and ctx.bias_dtype is not None else None,
            *([None] * (ctx.num_inputs - 3)),
        )

    return backward
