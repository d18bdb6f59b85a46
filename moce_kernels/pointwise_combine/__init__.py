"""``pointwise_combine``: the experts' last 1x1 convolutions write straight to image order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor
from moce_kernels._plan_checks import check_expert_plan, check_plan
from moce_kernels.grouped_pointwise import check_pointwise_args
from moce_kernels.pointwise_combine.reference import pointwise_combine_reference
from moce_kernels.route.reference import RoutingPlan

__all__ = ["pointwise_combine", "pointwise_combine_reference"]


def pointwise_combine(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: RoutingPlan,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    residual: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``combine(grouped_pointwise(h, ...) + dispatch(residual, plan), plan, gates)`` without the
    rows: ``out[b] = sum_j gates[b, j] * (W_e h[inverse[b*k + j]] + bias_e + residual[b])`` with
    e that row's expert, accumulated in registers and written once per image.

    Args:
        h: [B * k, Cin_max, H, W] float rows in the plan's expert order; a row of expert e reads
            its first ``in_channels[e]`` channels.
        weight: [E, Cout_max, Cin_max] in h's dtype; expert e uses
            ``weight[e, :out_channels[e], :in_channels[e]]``.
        bias: [E, Cout_max] in h's dtype, or None.
        plan: the :class:`~moce_kernels.RoutingPlan` that ordered the rows, over E experts.
        in_channels, out_channels: E ints each, in 1..Cin_max and 1..Cout_max.
        residual: optional [B, Cout_max, H, W] float images (any float dtype) added to each of
            the image's rows before the gates weigh them (the experts' skip connection).
        gates: optional [B, k] gates to use instead of ``plan.gates`` (e.g. with autograd history).
        backend: "auto" (the Triton kernel on a GPU, else the reference), "reference" or
            "triton". No C++ / CUDA kernel: a model on backend "cpu" / "cuda" runs the reference.

    Returns:
        [B, Cout_max, H, W] in h's dtype promoted with residual's; each row's product is rounded
        to h's dtype (as ``grouped_pointwise`` returns it), then the residual, gates and sum are
        accumulated in float32 (float64 for float64 inputs) in a fixed order. Differentiable in h,
        weight, bias, residual and gates (the backward recomputes the rows' products when the
        gates need a gradient, rather than keeping them from the forward).

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape; widths out of range; a
        plan for another device or number of experts, or a corrupted one (index values are
        checked on CPU tensors; on a GPU every backend trusts a plan from
        :func:`~moce_kernels.route`, as checking would read it on the host).
    """
    check_pointwise_args("h", h, weight, bias, in_channels, out_channels)
    plan = check_plan(plan, h.device)
    slots = plan.batch_size * plan.k
    if h.shape[0] != slots:
        raise ValueError(f"h must have B * k = {slots} rows (the plan's), got shape {tuple(h.shape)}")
    check_expert_plan(plan, weight, [("inverse", slots), ("sorted_slots", slots)])
    if residual is not None:
        check_tensor("residual", residual, ndim=4, dtypes=FLOAT_DTYPES, device=h.device)
        check_shape("residual", residual, (plan.batch_size, weight.shape[1], *h.shape[2:]))
    if gates is not None:
        check_tensor("gates", gates, ndim=2, dtypes=FLOAT_DTYPES, device=h.device)
        check_shape("gates", gates, (plan.batch_size, plan.k))
    else:
        check_shape("plan.gates", plan.gates, (plan.batch_size, plan.k))
    chosen = resolve_backend("pointwise_combine", backend, h.device)
    if chosen == "reference":
        return pointwise_combine_reference(h, weight, bias, plan, in_channels, out_channels, residual, gates)
    return implementation("pointwise_combine", chosen)(
        h, weight, bias, plan, list(in_channels), list(out_channels), residual, gates
    )
