"""``combine`` on the compiled kernels: ``torch.ops.moce.combine_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula, registered once per process. Both gradients are gathers or fixed-order reductions (no
atomics): deterministic.
"""

from __future__ import annotations

import torch

from moce_kernels import _extension
from moce_kernels.route.reference import RoutingPlan

_C = _extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _fwd_fake(y, gates, inverse, sorted_slots):
    torch._check(y.dim() >= 1, lambda: "y must be [S, ...]")
    return y.new_empty((gates.shape[0], *y.shape[1:]))  # [B, ...]


def _bwd_fake(grad_out, y, gates, inverse, sorted_slots):
    return y.new_empty(y.shape), gates.new_empty(gates.shape)


def _setup_context(ctx, inputs, output) -> None:
    y, gates, inverse, sorted_slots = inputs
    ctx.save_for_backward(y, gates, inverse, sorted_slots)


def _backward(ctx, grad_out):
    y, gates, inverse, sorted_slots = ctx.saved_tensors
    grad_y, grad_gates = torch.ops.moce.combine_bwd(grad_out.contiguous(), y, gates, inverse, sorted_slots)
    need_y, need_gates = ctx.needs_input_grad[:2]
    return (grad_y if need_y else None, grad_gates if need_gates else None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "moce::combine: double backward (differentiating the gradient) is not supported by the "
        "compiled kernels; use backend='reference'"
    )


def _register() -> None:
    # The flag lives on the extension module, which is never re-imported, so reloading this file
    # does not register twice.
    if getattr(_C, "_combine_registered", False):
        return
    torch.library.register_fake("moce::combine_fwd", _fwd_fake)
    torch.library.register_fake("moce::combine_bwd", _bwd_fake)
    torch.library.register_autograd("moce::combine_fwd", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "moce::combine_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )
    _C._combine_registered = True


_register()


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
