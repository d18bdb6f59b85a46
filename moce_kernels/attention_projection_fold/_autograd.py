"""attention_projection_fold's autograd formula for the Triton op (``moce_triton::``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    weight, attn = inputs
    ctx.save_for_backward(weight, attn)


def make_backward(attention_projection_fold_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``attention_projection_fold_bwd``."""

    def backward(ctx, grad_folded):
        weight, attn = ctx.saved_tensors
        grads = attention_projection_fold_bwd(grad_folded, weight, attn)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))

    return backward
