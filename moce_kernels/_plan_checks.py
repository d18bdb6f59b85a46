"""Validation of a RoutingPlan against the tensors it is applied to."""

from __future__ import annotations

import torch

from moce_kernels.route.reference import RoutingPlan


def check_plan(plan: object, device: torch.device) -> RoutingPlan:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan from moce_kernels.route, got {type(plan).__name__}")
    for name in ("sorted_images", "sorted_slots", "inverse", "gates", "offsets"):
        t = getattr(plan, name)
        if t.device != device:
            raise ValueError(f"plan.{name} is on {t.device} but the input is on {device}")
    return plan
