"""``route``: router logits -> top-k experts and gates per image, and the dispatch plan."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_finite, check_shape, check_tensor
from moce_kernels.route.reference import RoutingPlan, route_reference

__all__ = ["RoutingPlan", "route", "route_reference"]


def route(
    logits: torch.Tensor,
    k: int,
    noise: torch.Tensor | None = None,
    *,
    check_values: bool | None = None,
    backend: str = "auto",
) -> RoutingPlan:
    """Route each image to its top-k experts.

    Args:
        logits: [B, E] float tensor of router logits (any float dtype; routing runs in float32).
        k: number of experts per image, 1 <= k <= E.
        noise: optional [B, E] tensor added to the logits before the softmax that picks the
            gates (training noise; the caller draws it, so it is reproducible).
        check_values: reject NaN/Inf logits and noise. This reads one value on the host, so the default
            (None) checks CPU tensors only and leaves device tensors sync-free.
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see ``moce_kernels.BACKENDS``).

    Returns:
        A :class:`RoutingPlan`. Gates are the top-k probabilities of ``softmax(logits + noise)``,
        not renormalised over the k choices.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape; k outside 1..E;
        NaN/Inf in the logits or the noise (when ``check_values``).
    """
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in 1..E = 1..{num_experts}, got {k}")
    if noise is not None:
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES, device=logits.device)
        check_shape("noise", noise, logits.shape)
    if check_values or (
        check_values is None and logits.device.type == "cpu" and not torch.compiler.is_compiling()
    ):
        check_finite("logits", logits)
        if noise is not None:
            check_finite("noise", noise)
    chosen = resolve_backend("route", backend, logits.device)
    if chosen == "reference":
        return route_reference(logits, k, noise)
    return implementation("route", chosen)(logits, k, noise)
