"""``route`` on the compiled kernels: ``torch.ops.moce.route_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula, registered once per process. The CUDA op builds the whole plan on the device (three
launches, no host synchronisation) for up to 256 experts.

Top-k tie rule: among equal probabilities the LOWER expert index comes first; NaN ranks before
every number (as in torch.topk), so NaN logits (only reachable with ``check_values=False``)
still give k distinct in-range experts.

Autograd: the gates, ``probs`` and ``noisy_logits`` are differentiable w.r.t. the logits, and the
gates and ``noisy_logits`` w.r.t. the noise (it is additive), as in the reference. The backward
(``moce::route_bwd``) is the softmax Jacobian restricted to the chosen entries. Double backward
is not supported (clear error).
"""

from __future__ import annotations

import torch

from moce_kernels import _extension
from moce_kernels.route.reference import RoutingPlan

_C = _extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _fwd_fake(logits, noise, k):
    torch._check(logits.dim() == 2, lambda: f"logits must be [B, E], got shape {tuple(logits.shape)}")
    batch, num_experts = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    i64 = dict(dtype=torch.int64, device=logits.device)
    return (
        logits.new_empty((batch, k), **f32),
        logits.new_empty((batch, k), **i64),
        logits.new_empty((batch, num_experts), **f32),
        logits.new_empty((batch, num_experts), **f32),
        logits.new_empty((num_experts,), **i64),
        logits.new_empty((num_experts + 1,), **i64),
        logits.new_empty((batch * k,), **i64),
        logits.new_empty((batch * k,), **i64),
        logits.new_empty((batch * k,), **i64),
    )


def _bwd_fake(noisy, probs, experts, grad_gates, grad_probs, grad_noisy):
    return noisy.new_empty(noisy.shape), noisy.new_empty(noisy.shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, noise, _k = inputs
    _gates, experts, probs, noisy, *plan = output
    ctx.save_for_backward(noisy, probs, experts)
    ctx.logits_dtype = logits.dtype
    ctx.noise_dtype = None if noise is None else noise.dtype
    ctx.mark_non_differentiable(experts, *plan)
    # Unused outputs arrive as None, so their terms are skipped in the kernel.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_gates, _grad_experts, grad_probs, grad_noisy, *_plan_grads):
    noisy, probs, experts = ctx.saved_tensors
    need_logits, need_noise, _ = ctx.needs_input_grad
    if grad_gates is None and grad_probs is None and grad_noisy is None:
        return None, None, None
    grad_wrt_noisy, grad_wrt_logits = torch.ops.moce.route_bwd(
        noisy, probs, experts, grad_gates, grad_probs, grad_noisy
    )
    return (
        grad_wrt_logits.to(ctx.logits_dtype) if need_logits else None,
        grad_wrt_noisy.to(ctx.noise_dtype) if need_noise else None,
        None,
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "moce::route: double backward (differentiating the gradient) is not supported by the "
        "compiled kernels; use backend='reference'"
    )


def _register() -> None:
    # The flag lives on the extension module, which is never re-imported, so reloading this file
    # does not register twice.
    if getattr(_C, "_route_registered", False):
        return
    torch.library.register_fake("moce::route_fwd", _fwd_fake)
    torch.library.register_fake("moce::route_bwd", _bwd_fake)
    torch.library.register_autograd("moce::route_fwd", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "moce::route_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )
    _C._route_registered = True


_register()


def route_compiled(logits: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> RoutingPlan:
    """:func:`moce_kernels.route` with the C++ (CPU) or CUDA kernels of the logits' device.

    Arguments as ``route`` (which validates them first): logits [B, E] of any float dtype, k in
    1..E, optional noise [B, E]. Returns a :class:`RoutingPlan` on the logits' device, built
    without host reads; gates, probs and noisy_logits carry autograd history like the
    reference's. Top-k ties go to the lower expert index. Raises RuntimeError when the kernels of
    the logits' device are not built, or (CUDA) for more than 256 experts.
    """
    _extension.require("cuda" if logits.is_cuda else "cpu")
    return RoutingPlan(*torch.ops.moce.route_fwd(logits, noise, int(k)))
