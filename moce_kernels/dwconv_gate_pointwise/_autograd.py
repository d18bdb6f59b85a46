"""dwconv_gate_pointwise's autograd formula (the Triton ops): gradients of x, the depthwise
weight and bias, the 1x1 weight and bias (each in its own dtype) and the residual (grad y, in the
residual's dtype). The backward op recomputes the gate from the saved x: neither the 2 * Ch-channel
convolution output nor the Ch-channel gate is kept between forward and backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, dw_weight, dw_bias, weight, bias, residual = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, weight)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (dw_bias, bias, residual))


def make_backward(dwconv_gate_pointwise_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``dwconv_gate_pointwise_bwd``."""

    def backward(ctx, grad_y):
        x, dw_weight, dw_bias, weight = ctx.saved_tensors
        grad_x, grad_dw_weight, grad_dw_bias, grad_weight, grad_bias = dwconv_gate_pointwise_bwd(
            grad_y.contiguous(), x, dw_weight, dw_bias, weight
        )
        dw_bias_dtype, bias_dtype, residual_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        return (
            grad_x if need[0] else None,
            grad_dw_weight if need[1] else None,
            grad_dw_bias.to(dw_bias_dtype) if need[2] else None,
            grad_weight if need[3] else None,
            grad_bias.to(bias_dtype) if need[4] else None,
            grad_y.to(residual_dtype) if need[5] else None,
        )

    return backward
