"""``dwconv_gate_pointwise``: the GDFN's depthwise convolution, gate and ``project_out`` 1x1
convolution (with the block's residual add) in one pass."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_kernel_size, check_shape, check_tensor
from moce_kernels.dwconv_gate_pointwise.reference import dwconv_gate_pointwise_reference

__all__ = ["dwconv_gate_pointwise", "dwconv_gate_pointwise_reference"]


def dwconv_gate_pointwise(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``weight @ (gelu(a) * b) + bias + residual`` at every pixel, ``a, b`` the two halves of
    ``depthwise_conv(x, dw_weight, dw_bias)``: everything of the GDFN after its ``project_in``.

    Unfused (``dwconv_gelu_gate`` then ``fused_pointwise``) the Ch-channel gate goes to memory and
    is read back by the 1x1 convolution; here each program convolves the tiles of x its product
    needs and multiplies the gate in registers.

    Args:
        x: [B, 2 * Ch, H, W] float (``project_in``'s output; the gate multiplies channel c's
            GELU by channel c + Ch).
        dw_weight: [2 * Ch, K, K] depthwise kernels in x's dtype, K odd in 3..9 ("same" padding).
        dw_bias: [2 * Ch] in x's dtype, or None.
        weight: [C_out, Ch] float on x's device; the product runs in its dtype: the gate (rounded
            to x's dtype, as ``dwconv_gelu_gate`` writes it) is rounded to it, as autocast
            rounds a convolution's input.
        bias: [C_out] float or None, added in float32 before the product is rounded.
        residual: [B, C_out, H, W] float or None, added to the rounded product.
        backend: "auto" (the Triton kernel on a GPU, else the reference), "reference" (the
            unfused computation) or "triton". No C++ / CUDA kernel.

    Returns:
        [B, C_out, H, W] contiguous, in weight's dtype promoted with the residual's. The
        convolution and the product accumulate in float32 (float64 for float64). Differentiable
        in every tensor argument; the backward recomputes the gate instead of keeping it (the
        unfused layers keep it for the 1x1 weight's gradient).

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape, an odd channel count,
        an even or out-of-range kernel size.
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    batch, channels, height, width = x.shape
    if channels == 0 or channels % 2:
        raise ValueError(
            f"x must have an even, non-zero channel count (2 * Ch: the gate's halves), got shape "
            f"{tuple(x.shape)}"
        )
    check_tensor("dw_weight", dw_weight, ndim=3, dtypes=(x.dtype,), device=x.device)
    check_kernel_size("dw_weight's kernel size", dw_weight.shape[-1])
    check_shape("dw_weight", dw_weight, (channels, dw_weight.shape[-1], dw_weight.shape[-1]))
    if dw_bias is not None:
        check_tensor("dw_bias", dw_bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        check_shape("dw_bias", dw_bias, (channels,))
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if weight.shape[1] != channels // 2 or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be [C_out >= 1, Ch = {channels // 2}] (half of x's channels), got "
            f"{tuple(weight.shape)}"
        )
    c_out = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("bias", bias, (c_out,))
    if residual is not None:
        check_tensor("residual", residual, ndim=4, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("residual", residual, (batch, c_out, height, width))
    chosen = resolve_backend("dwconv_gate_pointwise", backend, x.device)
    if chosen == "reference":
        return dwconv_gate_pointwise_reference(x, dw_weight, dw_bias, weight, bias, residual)
    return implementation("dwconv_gate_pointwise", chosen)(x, dw_weight, dw_bias, weight, bias, residual)
