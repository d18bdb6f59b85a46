"""fused_pointwise's autograd formula (the Triton ops): gradients of x, weight, bias, the norm's
weight and bias (each in its own dtype) and the residual (grad y, in the residual's dtype); eps is
not differentiable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, weight, bias, norm_weight, norm_bias, eps, residual = inputs
    ctx.has_norm = norm_weight is not None
    ctx.save_for_backward(x, weight, *((norm_weight, norm_bias) if ctx.has_norm else ()))
    ctx.eps = eps
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, norm_bias, residual))


def make_backward(fused_pointwise_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``fused_pointwise_bwd``."""

    def backward(ctx, grad_y):
        x, weight, *norm = ctx.saved_tensors
        norm_weight, norm_bias = norm if ctx.has_norm else (None, None)
        grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias = fused_pointwise_bwd(
            grad_y.contiguous(), x, weight, norm_weight, norm_bias, ctx.eps
        )
        bias_dtype, norm_bias_dtype, residual_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        return (
            grad_x if need[0] else None,
            grad_weight if need[1] else None,
            grad_bias.to(bias_dtype) if need[2] else None,
            grad_norm_weight if need[3] else None,
            grad_norm_bias.to(norm_bias_dtype) if need[4] else None,
            None,
            grad_y.to(residual_dtype) if need[6] else None,
        )

    return backward
