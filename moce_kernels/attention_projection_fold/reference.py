"""Pure-PyTorch definition of ``attention_projection_fold``: channel attention's output
projection folded with each image's attention map."""

from __future__ import annotations

import torch


def attention_projection_fold_reference(weight: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``W_b = W @ blockdiag(attn_b[0], ..., attn_b[heads - 1])`` for weight [C_out, C] and
    attn [B, heads, D, D] (C = heads * D): [B, C_out, C] in weight's dtype, the map rounded to
    it first (as ``attn @ v`` rounds it to v's dtype), the products summed in float32 (float64
    for float64) and rounded once."""
    c_out, c = weight.shape
    batch, heads, d, _ = attn.shape
    return torch.einsum("ohd,bhde->bohe", weight.view(c_out, heads, d), attn.to(weight.dtype)).reshape(
        batch, c_out, c
    )
