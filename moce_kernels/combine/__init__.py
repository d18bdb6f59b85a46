"""``combine``: expert outputs back to image order, weighted by the gates, summed over k."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor
from moce_kernels._plan_checks import check_plan, check_plan_indices, check_plan_lengths
from moce_kernels.combine.reference import combine_reference
from moce_kernels.route.reference import RoutingPlan

__all__ = ["combine", "combine_reference"]


def combine(
    y: torch.Tensor,
    plan: RoutingPlan,
    gates: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Bring expert outputs back to image order: ``out[b] = sum_j gates[b, j] * y[inverse[b*k + j]]``.

    Args:
        y: [B * k, ...] float tensor of expert outputs in the plan's expert order.
        plan: the :class:`~moce_kernels.RoutingPlan` that ordered them.
        gates: optional [B, k] gates to use instead of ``plan.gates`` (for example gates that
            carry autograd history from the router while the plan was built from detached ones).
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see ``moce_kernels.BACKENDS``).

    Returns:
        [B, ...] tensor in ``y``'s dtype, accumulated in float32 (float64 for float64 inputs) in a
        fixed order (each output element is written once: deterministic). Differentiable in ``y``
        and ``gates``.

    Raises:
        TypeError / ValueError: wrong type, dtype, device, or a row count other than B * k; a
        corrupted plan: ``inverse`` / ``sorted_slots`` of a length other than B * k or
        ``plan.gates`` of a shape other than [B, k] (always checked), or indices out of range
        (checked on CPU tensors and by the reference backend; on a GPU the fast backends trust
        a plan from :func:`~moce_kernels.route`, as checking would read it on the host).
    """
    check_tensor("y", y, dtypes=FLOAT_DTYPES)
    plan = check_plan(plan, y.device)
    slots = plan.batch_size * plan.k
    if y.dim() < 1 or y.shape[0] != slots:
        raise ValueError(f"y must have B * k = {slots} rows (the plan's), got shape {tuple(y.shape)}")
    if gates is not None:
        check_tensor("gates", gates, ndim=2, dtypes=FLOAT_DTYPES, device=y.device)
        check_shape("gates", gates, (plan.batch_size, plan.k))
    else:
        check_shape("plan.gates", plan.gates, (plan.batch_size, plan.k))
    fields = [("inverse", slots), ("sorted_slots", slots)]
    check_plan_lengths(plan, [name for name, _ in fields])
    chosen = resolve_backend("combine", backend, y.device)
    if chosen == "reference" or (y.device.type == "cpu" and not torch.compiler.is_compiling()):
        check_plan_indices(plan, fields)
    if chosen == "reference":
        return combine_reference(y, plan, gates)
    return implementation("combine", chosen)(y, plan, gates)
