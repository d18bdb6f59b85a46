"""Pure-PyTorch definition of ``fused_pointwise``: a 1x1 convolution with the LayerNorm before it
and the residual add after it, as the trunk's blocks compute them unfused."""

from __future__ import annotations

import torch

from moce_kernels.layernorm2d.reference import layernorm2d_reference


def product_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of the product: float64 when either operand is, else float32."""
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


def output_dtype(weight: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """The result's dtype: the product's (weight's), promoted with the residual's when added."""
    return weight.dtype if residual is None else torch.promote_types(weight.dtype, residual.dtype)


def fused_pointwise_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`moce_kernels.fused_pointwise` (arguments are assumed valid here).

    The roundings of the unfused layers, in order: LayerNorm's result in x's dtype, the operand in
    weight's dtype (autocast's cast), products summed in float32 with the bias, the product in
    weight's dtype, then the residual added in the promoted dtype.
    """
    if norm_weight is not None:
        x = layernorm2d_reference(x, norm_weight, norm_bias, eps)
    acc = product_dtype(x, weight)
    operand = x.to(weight.dtype).to(acc)
    # A matmul rather than F.conv2d: cuDNN may run float32 convolutions on TF32.
    b, c_in, h, w = operand.shape
    # A [C_out, C_in] weight broadcasts over the images; a [B, C_out, C_in] one is per image.
    y = torch.matmul(weight.to(acc), operand.reshape(b, c_in, h * w)).view(b, weight.shape[-2], h, w)
    if bias is not None:
        y = y + bias.to(acc)[:, None, None]
    y = y.to(weight.dtype)
    if residual is not None:
        y = y + residual
    return y.to(output_dtype(weight, residual))
