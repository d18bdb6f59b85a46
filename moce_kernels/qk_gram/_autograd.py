"""qk_gram's autograd formula for the Triton op (``moce_triton::``): gradients of q and k from
those of the Gram matrix and of both squared norms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def setup_context(ctx, inputs, output) -> None:
    q, k = inputs
    ctx.save_for_backward(q, k)


def make_backward(qk_gram_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``qk_gram_bwd``."""

    def backward(ctx, grad_gram, grad_q_sq, grad_k_sq):
        q, k = ctx.saved_tensors
        # An output without a gradient may arrive as None: a missing gradient is a zero one.
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if grad_gram is None:
            grad_gram = q.new_zeros((*q.shape[:3], q.shape[2]), dtype=acc)
        if grad_q_sq is None:
            grad_q_sq = q.new_zeros(q.shape[:3], dtype=acc)
        if grad_k_sq is None:
            grad_k_sq = q.new_zeros(q.shape[:3], dtype=acc)
        grad_q, grad_k = qk_gram_bwd(grad_gram, grad_q_sq, grad_k_sq, q, k)  # made contiguous there
        need_q, need_k = ctx.needs_input_grad
        return (grad_q if need_q else None, grad_k if need_k else None)

    return backward
