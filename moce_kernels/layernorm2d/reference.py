"""Pure-PyTorch definition of ``layernorm2d``: LayerNorm over the channels of NCHW, no transposes."""

from __future__ import annotations

import torch


def layernorm2d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """``(x - mean_c) / sqrt(var_c + eps) * weight + bias`` at every pixel, population variance.

    Computed in float32, or float64 for float64 input (the same expression as the official
    "WithBias" LayerNorm), returned in ``x``'s dtype.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    mean = xf.mean(1, keepdim=True)  # [B, 1, H, W]
    # torch.var warns on an empty batch; there is nothing to normalise then.
    var = xf.var(1, keepdim=True, unbiased=False) if xf.numel() else torch.zeros_like(mean)
    y = (xf - mean) / torch.sqrt(var + eps) * weight.to(acc)[:, None, None] + bias.to(acc)[:, None, None]
    return y.to(x.dtype)
