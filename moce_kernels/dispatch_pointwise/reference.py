"""Pure-PyTorch definition of ``dispatch_pointwise``: ``dispatch`` then ``grouped_pointwise``.

The definition is the composition itself; the Triton kernel fuses the dispatch into the GEMM's
loads instead of writing the dispatched copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels.dispatch.reference import dispatch_reference
from moce_kernels.grouped_pointwise.reference import grouped_pointwise_reference
from moce_kernels.route.reference import RoutingPlan


def dispatch_pointwise_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: RoutingPlan,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
) -> torch.Tensor:
    """See :func:`moce_kernels.dispatch_pointwise` (arguments are assumed valid here)."""
    rows = dispatch_reference(x, plan)
    return grouped_pointwise_reference(rows, weight, bias, plan.offsets, in_channels, out_channels)
