"""``combine`` on the compiled kernels: ``torch.ops.moce.combine_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula (``_autograd.py``, shared with the Triton op), registered once per process. Both
gradients are gathers or fixed-order reductions (no atomics): deterministic.
"""

from __future__ import annotations

import torch

from moce_kernels import _extension, _library
from moce_kernels.combine import _autograd
from moce_kernels.route.reference import RoutingPlan

_extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _fwd_fake(y, gates, inverse, sorted_slots):
    torch._check(y.dim() >= 1, lambda: "y must be [S, ...]")
    return y.new_empty((gates.shape[0], *y.shape[1:]))  # [B, ...]


def _bwd_fake(grad_out, y, gates, inverse, sorted_slots):
    return y.new_empty(y.shape), gates.new_empty(gates.shape)


_library.register_compiled("combine", _fwd_fake, _bwd_fake, _autograd)


def combine_compiled(y: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor | None = None) -> torch.Tensor:
    """Expert outputs back to image order with the C++ (CPU) or CUDA kernel of y's device.

    Arguments as ``moce_kernels.combine`` (which validates them first). Returns [B, ...]
    contiguous in y's dtype, accumulated in float32 (float64 when y or the gates are float64);
    differentiable in y and the gates. Raises RuntimeError when the kernels of y's device are not
    built, or (CPU) when a plan index is out of range.
    """
    _extension.require("cuda" if y.is_cuda else "cpu")
    gates = plan.gates if gates is None else gates
    return torch.ops.moce.combine_fwd(y.contiguous(), gates, plan.inverse, plan.sorted_slots)
