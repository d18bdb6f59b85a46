"""Pure-PyTorch definition of ``combine``: expert outputs back to image order, gate-weighted."""

from __future__ import annotations

import math

import torch

from moce_kernels.route.reference import RoutingPlan


def _expand(gates: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, k] -> [B, k, 1, ..., 1] to broadcast against [B, k, *like.shape[1:]]."""
    return gates.view(*gates.shape, *([1] * (like.dim() - 1)))


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs; float64 inputs keep float64 (gradcheck needs it)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gates, inverse, sorted_slots):
        batch, k = gates.shape
        acc = _acc_dtype(y, gates)
        rows = y.index_select(0, inverse).view(batch, k, *y.shape[1:])  # [B, k, ...]
        out = (rows.to(acc) * _expand(gates.to(acc), y)).sum(1)
        # No no-op .to() on the output: under torch.compile (torch 2.11, Dynamo + AOTAutograd) an
        # autograd.Function whose forward returns `t.to(t.dtype)` gets all-zero input gradients.
        if out.dtype != y.dtype:
            out = out.to(y.dtype)
        ctx.save_for_backward(y, gates, inverse, sorted_slots)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, gates, inverse, sorted_slots = ctx.saved_tensors
        batch, k = gates.shape
        acc = _acc_dtype(y, gates, grad_out)
        # Explicit feature size: a -1 in view/reshape is ambiguous when B = 0.
        features = math.prod(y.shape[1:])
        grad_y = grad_gates = None
        if ctx.needs_input_grad[0]:
            # Slot (b, j) receives gates[b, j] * grad_out[b]; sorted row i takes slot sorted_slots[i].
            per_slot = (grad_out.to(acc).unsqueeze(1) * _expand(gates.to(acc), y)).reshape(
                batch * k, *y.shape[1:]
            )
            grad_y = per_slot.index_select(0, sorted_slots).to(y.dtype)
        if ctx.needs_input_grad[1]:
            rows = y.index_select(0, inverse).view(batch, k, features).to(acc)
            grad_gates = (rows * grad_out.to(acc).reshape(batch, 1, features)).sum(-1).to(gates.dtype)
        return grad_y, grad_gates, None, None


def combine_reference(y: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`moce_kernels.combine` (arguments are assumed valid here)."""
    gates = plan.gates if gates is None else gates
    return _Combine.apply(y, gates, plan.inverse, plan.sorted_slots)
