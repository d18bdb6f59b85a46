"""Validation of a RoutingPlan against the tensors it is applied to."""

from __future__ import annotations

import torch

from moce_kernels._checks import check_shape
from moce_kernels._grouping import check_offsets_on_host
from moce_kernels.route.reference import RoutingPlan


def check_plan(plan: object, device: torch.device) -> RoutingPlan:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan from moce_kernels.route, got {type(plan).__name__}")
    for name in ("sorted_images", "sorted_slots", "inverse", "gates", "offsets"):
        t = getattr(plan, name)
        if t.device != device:
            raise ValueError(f"plan.{name} is on {t.device} but the input is on {device}")
    return plan


def check_plan_lengths(plan: RoutingPlan, names: list[str]) -> None:
    """Each named index field of the plan must be [B * k] (shapes only: no host read)."""
    slots = plan.batch_size * plan.k
    for name in names:
        t = getattr(plan, name)
        if tuple(t.shape) != (slots,):
            raise ValueError(
                f"plan.{name} must have shape (B * k,) = ({slots},) (B = {plan.batch_size}, "
                f"k = {plan.k}: plan.experts' shape), got {tuple(t.shape)}: a corrupted plan?"
            )


def check_plan_indices(plan: RoutingPlan, fields: list[tuple[str, int]]) -> None:
    """Each (name, bound): the plan's field holds indices in [0, bound). Reads them on the host:
    free on the CPU, a synchronisation on a GPU."""
    for name, bound in fields:
        t = getattr(plan, name)
        outside = (t < 0) | (t >= bound)
        if t.numel() and bool(outside.any()):
            i = int(outside.nonzero()[0, 0])
            raise ValueError(
                f"plan.{name}[{i}] = {int(t[i])} is out of range [0, {bound}): a corrupted plan? "
                "(make plans with moce_kernels.route)"
            )


def check_expert_plan(plan: RoutingPlan, weight: torch.Tensor, fields: list[tuple[str, int]]) -> None:
    """The fused expert ops' plan: over weight's E experts, ``fields`` (name, bound) of length
    B * k, offsets [E + 1]. Index values are read on the host only for CPU tensors and not while
    torch.compile traces: these ops run inside the sync-free expert path, where on a GPU a plan
    from route is trusted (as the fast backends of dispatch / combine do)."""
    if plan.num_experts != weight.shape[0]:
        raise ValueError(
            f"weight must hold E = {plan.num_experts} experts (the plan's), got {weight.shape[0]}"
        )
    check_plan_lengths(plan, [name for name, _ in fields])
    check_shape("plan.offsets", plan.offsets, (plan.num_experts + 1,))
    if weight.device.type == "cpu" and not torch.compiler.is_compiling():
        check_plan_indices(plan, fields)
        check_offsets_on_host(plan.offsets, plan.batch_size * plan.k)
