"""dispatch's autograd formula, shared by the compiled (``moce::``) and Triton (``moce_triton::``)
ops: the gradient of x sums each image's k rows (a gather); the plan is not differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    x, _sorted_images, inverse = inputs
    ctx.save_for_backward(inverse)
    ctx.batch = x.shape[0]


def make_backward(dispatch_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``dispatch_bwd`` (compiled or Triton)."""

    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        return dispatch_bwd(grad_out.contiguous(), inverse, ctx.batch), None, None

    return backward
