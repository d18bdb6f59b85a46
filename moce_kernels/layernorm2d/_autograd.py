"""layernorm2d's autograd formula, shared by the compiled (``moce::``) and Triton
(``moce_triton::``) ops: gradients of x, weight and bias (in bias's own dtype); ``mean`` and
``rstd`` are by-products for the backward, not differentiable outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def make_backward(layernorm2d_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``layernorm2d_bwd`` (compiled or Triton)."""

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = layernorm2d_bwd(grad_y.contiguous(), x, weight, mean, rstd)
        need_x, need_weight, need_bias, _ = ctx.needs_input_grad
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None,
            None,
        )

    return backward
