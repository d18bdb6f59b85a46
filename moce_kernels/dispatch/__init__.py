"""``dispatch``: gather images into expert order, as the routing plan says."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import check_tensor
from moce_kernels._plan_checks import check_plan, check_plan_indices, check_plan_lengths
from moce_kernels.dispatch.reference import dispatch_reference
from moce_kernels.route.reference import RoutingPlan

__all__ = ["dispatch", "dispatch_reference"]


def dispatch(x: torch.Tensor, plan: RoutingPlan, *, backend: str = "auto") -> torch.Tensor:
    """Gather ``x`` into the plan's expert order.

    Args:
        x: [B, ...] tensor of any dtype (usually [B, C, H, W] features).
        plan: the :class:`~moce_kernels.RoutingPlan` of these B images.
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see ``moce_kernels.BACKENDS``).

    Returns:
        [B * k, ...] tensor: row ``i`` is ``x[plan.sorted_images[i]]``; expert e's inputs are rows
        ``plan.offsets[e]:plan.offsets[e + 1]``. Differentiable in ``x``; the backward is a
        gather that sums each image's k rows (deterministic, no atomics).

    Raises:
        TypeError / ValueError: ``x`` not a tensor, a plan for another batch size or device, a
        corrupted plan: ``sorted_images`` / ``inverse`` of a length other than B * k (always
        checked), or holding indices out of range (checked on CPU tensors and by the reference
        backend; on a GPU the fast backends trust a plan from :func:`~moce_kernels.route`, as
        checking would read it on the host).
    """
    check_tensor("x", x)
    plan = check_plan(plan, x.device)
    if x.dim() < 1 or x.shape[0] != plan.batch_size:
        raise ValueError(f"x must have batch size {plan.batch_size} (the plan's), got shape {tuple(x.shape)}")
    slots = plan.batch_size * plan.k
    fields = [("sorted_images", plan.batch_size), ("inverse", slots)]
    check_plan_lengths(plan, [name for name, _ in fields])
    chosen = resolve_backend("dispatch", backend, x.device)
    if chosen == "reference" or (x.device.type == "cpu" and not torch.compiler.is_compiling()):
        check_plan_indices(plan, fields)
    if chosen == "reference":
        return dispatch_reference(x, plan)
    return implementation("dispatch", chosen)(x, plan)
