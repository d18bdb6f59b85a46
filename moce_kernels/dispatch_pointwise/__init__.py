"""``dispatch_pointwise``: the experts' first 1x1 convolutions read the images in place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._plan_checks import check_expert_plan, check_plan
from moce_kernels.dispatch_pointwise.reference import dispatch_pointwise_reference
from moce_kernels.grouped_pointwise import check_pointwise_args
from moce_kernels.route.reference import RoutingPlan

__all__ = ["dispatch_pointwise", "dispatch_pointwise_reference"]


def dispatch_pointwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: RoutingPlan,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``grouped_pointwise(dispatch(x, plan), weight, bias, plan.offsets, ...)`` without the
    dispatched copy: row n reads image ``plan.sorted_images[n]`` straight from ``x``.

    Args:
        x: [B, Cin_max, H, W] float images of the plan's batch; a row of expert e reads the
            first ``in_channels[e]`` channels of its image.
        weight: [E, Cout_max, Cin_max] in x's dtype; expert e uses
            ``weight[e, :out_channels[e], :in_channels[e]]``.
        bias: [E, Cout_max] in x's dtype, or None.
        plan: the :class:`~moce_kernels.RoutingPlan` of these B images, over E experts.
        in_channels, out_channels: E ints each, in 1..Cin_max and 1..Cout_max.
        backend: "auto" (the Triton kernel on a GPU, else the reference), "reference" (dispatch
            then one batched GEMM) or "triton" (the gather fused into the grouped GEMM's loads).
            No C++ / CUDA kernel: a model on backend "cpu" / "cuda" runs the reference.

    Returns:
        [B * k, Cout_max, H, W] rows in the plan's expert order, in x's dtype (accumulated in
        float32; float64 for float64), exact zeros past each expert's output channels.
        Differentiable in x (each image's gradient sums its k rows in a fixed order: no atomics),
        weight and bias.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape; widths out of range; a
        plan for another batch size, device or number of experts, or a corrupted one (index
        values are checked on CPU tensors; on a GPU every backend trusts a plan from
        :func:`~moce_kernels.route`, as checking would read it on the host).
    """
    check_pointwise_args("x", x, weight, bias, in_channels, out_channels)
    plan = check_plan(plan, x.device)
    if x.shape[0] != plan.batch_size:
        raise ValueError(f"x must have batch size {plan.batch_size} (the plan's), got shape {tuple(x.shape)}")
    slots = plan.batch_size * plan.k
    check_expert_plan(plan, weight, [("sorted_images", plan.batch_size), ("inverse", slots)])
    chosen = resolve_backend("dispatch_pointwise", backend, x.device)
    if chosen == "reference":
        return dispatch_pointwise_reference(x, weight, bias, plan, in_channels, out_channels)
    return implementation("dispatch_pointwise", chosen)(
        x, weight, bias, plan, list(in_channels), list(out_channels)
    )
