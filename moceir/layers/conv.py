"""Depthwise convolution of the trunk, backed by ``moce_kernels.grouped_dwconv``."""

from __future__ import annotations

import torch
from torch import nn

from moce_kernels import grouped_dwconv
from moce_kernels._backend import op_backend


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(C, C, k, padding=k // 2, groups=C)``: same parameters and state-dict keys.

    With a fast backend the convolution runs as one group of ``grouped_dwconv`` (on a GPU
    cuDNN's depthwise kernels are far from the memory roofline, in bf16 especially); with
    ``backend="reference"`` it is the plain ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool) -> None:
        super().__init__(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias
        )
        self.backend = "auto"

    def autocast_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, weight, bias) as nn.Conv2d would compute with them: under autocast, in the autocast
        dtype (differentiable casts: the float32 parameters get their gradients)."""
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return x, weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = op_backend("grouped_dwconv", self.backend)
        x, weight, bias = self.autocast_operands(x)
        if backend == "reference" or x.dim() != 4 or x.dtype != weight.dtype:
            # The reference path (and inputs grouped_dwconv does not take) keep nn.Conv2d's
            # own behaviour and errors.
            return super().forward(x)
        c, k = self.in_channels, self.kernel_size[0]
        # offsets [0, N] made on the device: no host-to-device copy (CUDA-graph safe).
        offsets = torch.arange(2, device=x.device) * x.shape[0]
        bias = None if bias is None else bias.view(1, c)
        with torch.autocast(x.device.type, enabled=False):
            return grouped_dwconv(
                x.contiguous(), weight.view(1, c, k, k), bias, offsets, [c], [k], backend=backend
            )
