"""LayerNorm over channels ("WithBias" in the official code), backed by ``moce_kernels.layernorm2d``."""

from __future__ import annotations

import torch
from torch import nn

from moce_kernels import layernorm2d
from moce_kernels._backend import op_backend


class _Affine(nn.Module):
    """Holds ``weight`` and ``bias``: the official module nests them under ``.body``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class LayerNorm2d(nn.Module):
    """``(x - mean_c) / sqrt(var_c + 1e-5) * weight + bias`` at every pixel of [B, C, H, W]."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.body = _Affine(dim)
        self.eps = eps
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = op_backend("layernorm2d", self.backend)
        return layernorm2d(x, self.body.weight, self.body.bias, self.eps, backend=backend)
