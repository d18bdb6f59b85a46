"""combine's autograd formula, shared by the compiled (``moce::``) and Triton (``moce_triton::``)
ops: the gradients of y (a gather) and of the gates (fixed-order dot products); the plan is not
differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    y, gates, inverse, sorted_slots = inputs
    ctx.save_for_backward(y, gates, inverse, sorted_slots)


def make_backward(combine_bwd: Callable[..., Any], *, takes_needs: bool = False) -> Callable[..., Any]:
    """The forward op's backward, calling ``combine_bwd`` (compiled or Triton).

    ``takes_needs``: the backward op also takes (need_y, need_gates) and skips what is not needed
    (the Triton op); the compiled op always computes both.
    """

    def backward(ctx, grad_out):
        y, gates, inverse, sorted_slots = ctx.saved_tensors
        need_y, need_gates = ctx.needs_input_grad[:2]
        needs = (need_y, need_gates) if takes_needs else ()
        grad_y, grad_gates = combine_bwd(grad_out.contiguous(), y, gates, inverse, sorted_slots, *needs)
        return (grad_y if need_y else None), (grad_gates if need_gates else None), None, None

    return backward
