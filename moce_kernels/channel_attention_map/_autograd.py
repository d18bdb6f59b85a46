"""channel_attention_map's autograd formula for the Triton op (``moce_triton::``): gradients of
q, k and the temperature from the map's, through the sums the forward kept (the Gram matrix and
both squared norms)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def setup_context(ctx, inputs, output) -> None:
    q, k, temperature = inputs
    attn_map, gram, q_sq, k_sq = output
    # The sums are kept for the backward only: gradients through them are not computed.
    ctx.mark_non_differentiable(gram, q_sq, k_sq)
    ctx.save_for_backward(q, k, temperature, attn_map, gram, q_sq, k_sq)


def make_backward(channel_attention_map_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``channel_attention_map_bwd``."""

    def backward(ctx, grad_map, *_):
        q, k, temperature, attn_map, gram, q_sq, k_sq = ctx.saved_tensors
        if grad_map is None:  # a missing gradient is a zero one
            grad_map = torch.zeros_like(attn_map)
        grads = channel_attention_map_bwd(grad_map, attn_map, gram, q_sq, k_sq, temperature, q, k)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))

    return backward
