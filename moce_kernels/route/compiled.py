"""``route`` on the compiled kernels: ``torch.ops.moce.route_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula (``_autograd.py``, shared with the Triton op), registered once per process. The CUDA op
builds the whole plan on the device (three launches, no host synchronisation) for up to 256
experts.

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

from moce_kernels import _extension, _library
from moce_kernels.route import _autograd
from moce_kernels.route.reference import RoutingPlan

_extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


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


_library.register_compiled("route", _fwd_fake, _bwd_fake, _autograd)


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
