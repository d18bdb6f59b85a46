"""Pure-PyTorch definition of ``channel_attention_map``: Restormer's channel-attention map, the
L2 normalisation folded onto the map, in float32 (float64 for float64 input)."""

from __future__ import annotations

import torch

#: F.normalize's eps: each norm is max(|x|, eps).
EPS = 1e-12


def channel_attention_map_reference(
    q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """``softmax(normalize(q) @ normalize(k)^T * temperature)`` for q, k [B, heads, D, N] and one
    temperature per head, as ``(q @ k^T) / (max(|q_i|, eps) max(|k_j|, eps)) * t``.

    q and k are promoted to float32 (float64 stays float64) before the products; the map comes
    in that dtype.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(acc), k.to(acc)
    q_norm = torch.linalg.vector_norm(qf, dim=-1).clamp_min(EPS)
    k_norm = torch.linalg.vector_norm(kf, dim=-1).clamp_min(EPS)
    t = temperature.reshape(q.shape[1], 1, 1).to(acc)
    cosine = (qf @ kf.transpose(-2, -1)) / (q_norm[..., :, None] * k_norm[..., None, :])
    return (cosine * t).softmax(dim=-1)
