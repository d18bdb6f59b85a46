"""Pure-PyTorch definition of ``dwconv_gelu_gate``: the GDFN's depthwise convolution and gate.

Restormer's gated feed-forward network runs a depthwise "same" convolution over 2 * Ch channels
and multiplies ``gelu(first half)`` by the second half. Fused, the 2 * Ch-channel convolution
output never goes to memory: a kernel reads x once and writes the Ch-channel gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dwconv_gelu_gate_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``a, b = depthwise_conv(x, weight, bias).chunk(2, 1); gelu(a) * b`` (exact, erf GELU).

    x: [B, 2 * Ch, H, W]; weight: [2 * Ch, K, K] (K odd, padding K // 2); bias: [2 * Ch] or None.
    Returns [B, Ch, H, W] in x's dtype (computed in float32 for half-precision input, as the
    fast kernels accumulate; float64 stays float64).
    """
    channels, k = weight.shape[0], weight.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(acc).unsqueeze(1)  # [2 Ch, 1, K, K]
    b = None if bias is None else bias.to(acc)
    y = F.conv2d(x.to(acc), w, b, padding=k // 2, groups=channels)
    a, gate = y.chunk(2, dim=1)
    return (F.gelu(a) * gate).to(x.dtype)
