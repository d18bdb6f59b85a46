"""``grouped_layernorm2d``: LayerNorm over each expert's own channels, every row at once."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor
from moce_kernels._grouping import check_channels, check_offsets_on_host
from moce_kernels.grouped_layernorm2d.reference import grouped_layernorm2d_reference

__all__ = ["grouped_layernorm2d", "grouped_layernorm2d_reference"]


def grouped_layernorm2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    offsets: torch.Tensor,
    channels: Sequence[int],
    eps: float = 1e-5,
    *,
    gate: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Expert e's LayerNorm2d (``weight[e]``, ``bias[e]``) over the first ``channels[e]`` channels
    of its rows: ``(x - mean) / sqrt(var + eps) * weight + bias`` at every pixel, times ``gate``
    when given (the expert's ``LN(attention) * v``: the product never goes to memory unrounded).

    Args:
        x: [N, C_max, H, W] float rows sorted by expert; expert e owns rows
            ``offsets[e]:offsets[e + 1]`` and their first ``channels[e]`` channels (the others are
            ignored).
        weight, bias: [E, C_max], any float dtype, on x's device.
        offsets: [E + 1] int64 / int32 row offsets on x's device (``RoutingPlan.offsets``).
        channels: E ints in 1..C_max.
        eps: added to the population variance, > 0.
        gate: None, or [N, C_max, H, W] (x's shape, any float dtype, x's device): the result is
            ``LN(x) * gate`` computed in the statistics' dtype and rounded once to the gate's
            dtype (the gate's channels past each expert's are never read).
        backend: "auto" (the Triton kernel on a GPU, else the reference), "reference" (masked
            statistics over C_max channels, no host read) or "triton" (one pass over each row's
            own channels, deterministic parameter gradients). No C++ / CUDA kernel yet: a model on
            backend "cpu" / "cuda" runs the reference for this op.

    Returns:
        [N, C_max, H, W] in x's dtype, the gate's with a gate (statistics in float32, float64 for
        float64 input); channels past ``channels[e]`` of expert e's rows are exact zeros.
        Differentiable in x, weight, bias and gate.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape, channel counts out of
        range, eps <= 0, offsets that are not a non-decreasing 0..N sequence (values checked for
        CPU tensors only: on a GPU that would read them on the host).
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("bias", bias, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64, torch.int32), device=x.device)
    num_experts = weight.shape[0]
    check_shape("weight", weight, (num_experts, x.shape[1]))
    check_shape("bias", bias, (num_experts, x.shape[1]))
    check_shape("offsets", offsets, (num_experts + 1,))
    check_channels("channels", channels, num_experts, x.shape[1])
    if gate is not None:
        check_tensor("gate", gate, ndim=4, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("gate", gate, tuple(x.shape))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float > 0, got {type(eps).__name__} ({eps!r})")
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        check_offsets_on_host(offsets, x.shape[0])
    chosen = resolve_backend("grouped_layernorm2d", backend, x.device)
    if chosen == "reference":
        return grouped_layernorm2d_reference(x, weight, bias, offsets, channels, float(eps), gate)
    return implementation("grouped_layernorm2d", chosen)(
        x, weight, bias, offsets, list(channels), float(eps), gate
    )
