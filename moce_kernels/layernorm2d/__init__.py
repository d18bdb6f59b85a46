"""``layernorm2d``: LayerNorm over the channel axis of NCHW tensors, without transposes."""

from __future__ import annotations

import numbers

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor
from moce_kernels.layernorm2d.reference import layernorm2d_reference

__all__ = ["layernorm2d", "layernorm2d_reference"]


def layernorm2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over C of a [B, C, H, W] tensor: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        x: [B, C, H, W] float32 / bfloat16 / float16 / float64 (statistics in float32, or float64
            for float64 input).
        weight, bias: [C], on x's device.
        eps: added to the population variance, > 0.
        backend: "auto" (the compiled kernel of x's device when built, else the reference),
            "reference", "cpu" (C++ kernel) or "cuda" (CUDA kernel).

    Returns:
        [B, C, H, W] in ``x``'s dtype. NaN/Inf in a pixel's channels propagate to that pixel.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape, eps not a number or <= 0.
        RuntimeError: a compiled backend that is not built or not usable here (says how to fix).
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    channels = x.shape[1]
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("weight", weight, (channels,))
    check_shape("bias", bias, (channels,))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float > 0, got {type(eps).__name__} ({eps!r})")
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    chosen = resolve_backend("layernorm2d", backend, x.device)
    if chosen == "reference":
        return layernorm2d_reference(x, weight, bias, eps)
    return implementation("layernorm2d", chosen)(x, weight, bias, eps)
