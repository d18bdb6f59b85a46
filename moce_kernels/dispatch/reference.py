"""Pure-PyTorch definition of ``dispatch``: gather each image to the experts that chose it."""

from __future__ import annotations

import torch

from moce_kernels.route.reference import RoutingPlan


def gather_rows_sum_k(grad_sorted: torch.Tensor, inverse: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """[S, ...] rows in expert order -> [B, ...] sums over each image's k slots (a gather, no atomics)."""
    rows = grad_sorted.index_select(0, inverse)  # [S, ...] in slot order b * k + j
    return rows.view(batch, k, *grad_sorted.shape[1:]).sum(1)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sorted_images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.batch = x.shape[0]
        return x.index_select(0, sorted_images)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        k = inverse.numel() // ctx.batch if ctx.batch else 1
        # The autograd of index_select would scatter-add (atomics on CUDA); gather instead.
        return gather_rows_sum_k(grad_out, inverse, ctx.batch, k), None, None


def dispatch_reference(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """See :func:`moce_kernels.dispatch` (arguments are assumed valid here)."""
    return _Dispatch.apply(x, plan.sorted_images, plan.inverse)
