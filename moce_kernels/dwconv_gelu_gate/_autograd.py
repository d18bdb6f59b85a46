"""dwconv_gelu_gate's autograd formula, shared by the compiled (``moce::``) and Triton
(``moce_triton::``) ops: the backward op recomputes the convolution from the saved x (the
2 * Ch-channel convolution output is never stored) and returns the gradients of x, weight and
bias (the latter in bias's own dtype).

Op schemas: ``dwconv_gelu_gate_fwd(x, weight, bias?) -> y`` and
``dwconv_gelu_gate_bwd(grad_y, x, weight, bias?) -> (grad_x, grad_weight, grad_bias)``, with
grad_bias [2 * Ch] in weight's dtype (zeros when bias is None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.bias_dtype = None if bias is None else bias.dtype


def make_backward(dwconv_gelu_gate_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``dwconv_gelu_gate_bwd`` (compiled or Triton)."""

    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = dwconv_gelu_gate_bwd(grad_y.contiguous(), x, weight, bias)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            grad_x if need_x else None,
            grad_weight if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias and ctx.bias_dtype is not None else None,
        )

    return backward
