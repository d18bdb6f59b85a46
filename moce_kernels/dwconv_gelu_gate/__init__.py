"""``dwconv_gelu_gate``: the GDFN's depthwise convolution fused with ``gelu(x1) * x2``."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_kernel_size, check_shape, check_tensor
from moce_kernels.dwconv_gelu_gate.reference import dwconv_gelu_gate_reference

__all__ = ["dwconv_gelu_gate", "dwconv_gelu_gate_reference"]


def dwconv_gelu_gate(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, backend: str = "auto"
) -> torch.Tensor:
    """``a, b = depthwise_conv(x, weight, bias).chunk(2, dim=1); return gelu(a) * b``.

    Args:
        x: [B, 2 * Ch, H, W] float (the GDFN's ``project_in`` output).
        weight: [2 * Ch, K, K] depthwise kernels in x's dtype, K odd in 3..9 ("same" padding).
        bias: [2 * Ch] in x's dtype, or None.
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see ``moce_kernels.BACKENDS``).

    Returns:
        [B, Ch, H, W] in x's dtype (float32 accumulation; exact erf GELU). Differentiable in x,
        weight and bias; the fast backends' backward recomputes the convolution instead of
        keeping its 2 * Ch-channel output.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape, an odd channel count,
        an even or out-of-range kernel size.
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=3, dtypes=(x.dtype,), device=x.device)
    channels = x.shape[1]
    if channels % 2:
        raise ValueError(
            f"x must have an even channel count (2 * Ch: gate halves), got shape {tuple(x.shape)}"
        )
    check_kernel_size("weight's kernel size", weight.shape[-1])
    check_shape("weight", weight, (channels, weight.shape[-1], weight.shape[-1]))
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        check_shape("bias", bias, (channels,))
    chosen = resolve_backend("dwconv_gelu_gate", backend, x.device)
    if chosen == "reference":
        return dwconv_gelu_gate_reference(x, weight, bias)
    return implementation("dwconv_gelu_gate", chosen)(x, weight, bias)
