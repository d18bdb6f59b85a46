"""``attention_projection_fold``: channel attention's output projection folded with each image's
map, ``W @ blockdiag(attn_b)``, so that ``attn @ v`` and the projection are one per-image 1x1
convolution (``fused_pointwise`` with a per-image weight)."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_tensor
from moce_kernels.attention_projection_fold.reference import attention_projection_fold_reference

__all__ = ["attention_projection_fold", "attention_projection_fold_reference"]


def attention_projection_fold(
    weight: torch.Tensor, attn: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``W_b = W @ blockdiag(attn_b)`` per image b: ``project_out(attn @ v) = W_b @ v + bias``.

    Restormer's channel attention multiplies v by a small map per image and head, then projects
    the result with a 1x1 convolution. Folding the map into the projection's weight (C_out x C
    per image) lets one GEMM read v in place and write the projection, so ``attn @ v`` never
    goes to memory. Unfused, the fold itself is a cast of the map, an einsum (a permuted copy,
    a batched GEMM) and a reshape copy; the Triton kernel writes W_b in one launch.

    Args:
        weight: [C_out, C] float (the projection's 1x1 weight; the product's dtype).
        attn: [B, heads, D, D] float on weight's device, heads * D = C, any strides (the map of
            ``moce_kernels.channel_attention_map``: float32); rounded to weight's dtype.
        backend: "auto" (the Triton kernel on a GPU, else the reference), "reference" or
            "triton". No C++ / CUDA kernel.

    Returns:
        [B, C_out, C] contiguous in weight's dtype: products summed in float32 (float64 for a
        float64 weight) and rounded once, as the reference's batched GEMM. Differentiable in
        weight and attn (not twice).

    Raises:
        TypeError / ValueError: not tensors, wrong rank, dtype, device or shape.
        RuntimeError: a backend that is not available here (says why).
    """
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("attn", attn, ndim=4, dtypes=FLOAT_DTYPES, device=weight.device)
    batch, heads, d, e = attn.shape
    if d != e:
        raise ValueError(f"attn must hold square [D, D] maps, got shape {tuple(attn.shape)}")
    if heads * d != weight.shape[1]:
        raise ValueError(
            f"weight must have heads * D = {heads * d} input channels (attn's shape "
            f"{tuple(attn.shape)}), got weight of shape {tuple(weight.shape)}"
        )
    chosen = resolve_backend("attention_projection_fold", backend, weight.device)
    if chosen == "reference":
        return attention_projection_fold_reference(weight, attn)
    return implementation("attention_projection_fold", chosen)(weight, attn)
