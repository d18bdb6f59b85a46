"""``fused_pointwise``: the trunk's 1x1 convolution with its neighbours, LayerNorm and residual add."""

from __future__ import annotations

import numbers

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor
from moce_kernels.fused_pointwise.reference import fused_pointwise_reference

__all__ = ["fused_pointwise", "fused_pointwise_reference"]


def fused_pointwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``weight @ LayerNorm(x) + bias + residual`` at every pixel, in one pass over x.

    The blocks of MoCE-IR's trunk normalise x over its channels and feed the result to 1x1
    convolutions only (qkv, project_in, the decoder's two projections), and add their branch back
    after a 1x1 convolution (project_out). Unfused, the LayerNorm's output and the convolution's
    output each go to memory and are read back; here the statistics come from the tiles the
    product reads anyway, and the residual is added in the product's store.

    Args:
        x: [B, C_in, H, W] float; read in place when each image's [C_in, H, W] block is
            contiguous (a channel chunk of a wider tensor), else copied.
        weight: [C_out, C_in], or [B, C_out, C_in] for a weight per image (a projection folded
            with a per-image map, as the attention's ``project_out @ attn``), float on x's device;
            the product runs in its dtype: x (normalised when a norm is given) is rounded to it,
            as autocast rounds a convolution's input.
        bias: [C_out] float or None, added in float32 before the product is rounded.
        norm_weight, norm_bias: [C_in] float (both or neither): LayerNorm over x's channels
            first, ``(x - mean) / sqrt(var + eps) * norm_weight + norm_bias`` in float32,
            rounded to x's dtype (``moce_kernels.layernorm2d``).
        eps: the LayerNorm's, > 0.
        residual: [B, C_out, H, W] float or None, added to the rounded product.
        backend: "auto" (the Triton kernel on a GPU, else the reference), "reference" (the
            unfused computation) or "triton". No C++ / CUDA kernel: a model on backend "cpu" /
            "cuda" runs its layers unfused.

    Returns:
        [B, C_out, H, W] contiguous, in weight's dtype promoted with the residual's (float32 for
        a bf16 product with a float32 residual, as ``bf16_conv(x) + x_fp32`` gives). Products
        accumulate in float32 (float64 when x or weight is float64). Differentiable in every
        tensor argument; the backward recomputes the normalised x instead of keeping it.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape, only one of the norm's
        parameters, eps <= 0.
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    batch, c_in, height, width = x.shape
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, device=x.device)
    if c_in == 0:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    per_image = weight.dim() == 3 and weight.shape[0] == batch
    if (
        weight.dim() not in (2, 3)
        or weight.shape[-1] != c_in
        or weight.shape[-2] == 0
        or (weight.dim() == 3 and not per_image)
    ):
        raise ValueError(
            f"weight must be [C_out >= 1, C_in = {c_in}] (x's channels) or [B = {batch}, C_out, C_in] "
            f"(one per image), got {tuple(weight.shape)}"
        )
    c_out = weight.shape[-2]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("bias", bias, (c_out,))
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("norm_weight and norm_bias must be given together (or neither)")
    if norm_weight is not None:
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
            check_shape(name, t, (c_in,))
    if residual is not None:
        check_tensor("residual", residual, ndim=4, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("residual", residual, (batch, c_out, height, width))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float > 0, got {type(eps).__name__} ({eps!r})")
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    chosen = resolve_backend("fused_pointwise", backend, x.device)
    if chosen == "reference":
        return fused_pointwise_reference(x, weight, bias, norm_weight, norm_bias, float(eps), residual)
    return implementation("fused_pointwise", chosen)(
        x, weight, bias, norm_weight, norm_bias, float(eps), residual
    )
