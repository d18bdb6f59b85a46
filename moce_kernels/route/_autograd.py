"""route's autograd formula, shared by the compiled (``moce::``) and Triton (``moce_triton::``) ops.

The gates, ``probs`` and ``noisy_logits`` are differentiable w.r.t. the logits, and the gates and
``noisy_logits`` w.r.t. the noise (it is additive), as in the reference; the index fields are
not differentiable. The backward op is the softmax Jacobian restricted to the chosen entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def setup_context(ctx, inputs, output) -> None:
    logits, noise, _k = inputs
    _gates, experts, probs, noisy, *plan = output
    ctx.save_for_backward(noisy, probs, experts)
    ctx.logits_dtype = logits.dtype
    ctx.noise_dtype = None if noise is None else noise.dtype
    ctx.mark_non_differentiable(experts, *plan)
    # Unused outputs arrive as None, so their terms are skipped in the kernel.
    ctx.set_materialize_grads(False)


def make_backward(route_bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The forward op's backward, calling ``route_bwd`` (``moce::route_bwd`` or its Triton twin)."""

    def backward(ctx, grad_gates, _grad_experts, grad_probs, grad_noisy, *_plan_grads):
        noisy, probs, experts = ctx.saved_tensors
        need_logits, need_noise, _ = ctx.needs_input_grad
        if grad_gates is None and grad_probs is None and grad_noisy is None:
            return None, None, None
        grad_wrt_noisy, grad_wrt_logits = route_bwd(noisy, probs, experts, grad_gates, grad_probs, grad_noisy)
        return (
            grad_wrt_logits.to(ctx.logits_dtype) if need_logits else None,
            grad_wrt_noisy.to(ctx.noise_dtype) if need_noise else None,
            None,
        )

    return backward
