"""Pure-PyTorch definition of ``qk_gram``: the Gram matrix of channel attention and the norms it
divides by, the products in float32 (float64 for float64 input)."""

from __future__ import annotations

import torch


def qk_gram_reference(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q @ k^T, sum(q^2, -1), sum(k^2, -1))`` for q, k [B, heads, D, N].

    The inputs are promoted to float32 (float64 stays float64) before the products, so bfloat16
    input gives the float32 sums its products would accumulate into.
    """
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    qf, kf = q.to(acc), k.to(acc)
    return qf @ kf.transpose(-2, -1), qf.square().sum(-1), kf.square().sum(-1)
