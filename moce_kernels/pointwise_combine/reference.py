"""Pure-PyTorch definition of ``pointwise_combine``: ``grouped_pointwise``, the residual, then
``combine``.

The definition is the composition itself; the Triton kernel fuses the residual, the gate
weighting, the sum over the k choices and the write back to image order into the GEMM's store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels.combine.reference import combine_reference
from moce_kernels.dispatch.reference import dispatch_reference
from moce_kernels.grouped_pointwise.reference import grouped_pointwise_reference
from moce_kernels.route.reference import RoutingPlan


def pointwise_combine_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: RoutingPlan,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    residual: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`moce_kernels.pointwise_combine` (arguments are assumed valid here)."""
    y = grouped_pointwise_reference(h, weight, bias, plan.offsets, in_channels, out_channels)
    if residual is not None:
        y = y + dispatch_reference(residual, plan)
    return combine_reference(y, plan, gates)
