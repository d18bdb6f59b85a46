"""pointwise_combine's autograd formula, for the Triton (``moce_triton::``) ops: gradients of h,
weight, bias, residual and gates (each in its own dtype); the plan's index tensors and the
widths are not differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    h, weight, bias, residual, gates, offsets, inverse, sorted_slots, in_channels, out_channels = inputs
    ctx.save_for_backward(h, weight, bias, residual, gates, offsets, inverse, sorted_slots)
    ctx.ints = (list(in_channels), list(out_channels))


def make_backward(op_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling the backward op ``op_bwd``."""

    def backward(ctx, grad_out):
        h, weight, bias, residual, gates, offsets, inverse, sorted_slots = ctx.saved_tensors
        need_h, need_weight, need_bias, need_residual, need_gates = ctx.needs_input_grad[:5]
        grad_h, grad_weight, grad_bias, grad_residual, grad_gates = op_bwd(
            grad_out.contiguous(), h, weight, bias, residual, gates, offsets, inverse, sorted_slots,
            *ctx.ints, need_residual, need_gates,
        )  # fmt: skip
        return (
            grad_h if need_h else None,
            grad_weight if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            grad_residual if need_residual else None,
            grad_gates if need_gates else None,
            None,
            None,
            None,
            None,
            None,
        )

    return backward
