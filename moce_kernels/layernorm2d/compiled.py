"""``layernorm2d`` on the compiled kernels: ``torch.ops.moce.layernorm2d_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula (``_autograd.py``, shared with the Triton op), registered once per process.
"""

from __future__ import annotations

import torch

from moce_kernels import _extension, _library
from moce_kernels.layernorm2d import _autograd

_extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _layernorm2d_fwd_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(x.dim() == 4, lambda: f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    B, _, H, W = x.shape
    y = x.new_empty(x.shape)  # [B, C, H, W], contiguous like the kernels' output
    mean = x.new_empty((B, H, W), dtype=_stats_dtype(x))
    rstd = x.new_empty((B, H, W), dtype=_stats_dtype(x))
    return y, mean, rstd


def _layernorm2d_bwd_fake(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x = x.new_empty(x.shape)
    return grad_x, weight.new_empty(weight.shape), weight.new_empty(weight.shape)


_library.register_compiled("layernorm2d", _layernorm2d_fwd_fake, _layernorm2d_bwd_fake, _autograd)


def layernorm2d_compiled(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over C of a [B, C, H, W] tensor with the C++ (CPU) or CUDA kernel of x's device.

    Arguments as ``moce_kernels.layernorm2d`` (which validates them first). Returns y, [B, C, H, W]
    contiguous in x's dtype. Raises RuntimeError when the kernels of x's device are not built.
    """
    _extension.require("cuda" if x.is_cuda else "cpu")
    y, _mean, _rstd = torch.ops.moce.layernorm2d_fwd(x.contiguous(), weight, bias, float(eps))
    return y
