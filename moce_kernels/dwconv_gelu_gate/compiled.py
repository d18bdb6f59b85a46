"""``dwconv_gelu_gate`` on the compiled kernels: ``torch.ops.moce.dwconv_gelu_gate_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula (``_autograd.py``, shared with the Triton op), registered once per process.

The backward op recomputes the convolution from x: the forward keeps no 2 * Ch-channel tensor.
"""

from __future__ import annotations

import torch

from moce_kernels import _extension, _library
from moce_kernels.dwconv_gelu_gate import _autograd

_extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _fwd_fake(x, weight, bias):
    torch._check(x.dim() == 4, lambda: f"x must be [B, 2 * Ch, H, W], got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    torch._check(channels % 2 == 0, lambda: f"x must have an even channel count, got shape {tuple(x.shape)}")
    return x.new_empty((batch, channels // 2, height, width))  # contiguous like the kernels' output


def _bwd_fake(grad_y, x, weight, bias):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


_library.register_compiled("dwconv_gelu_gate", _fwd_fake, _bwd_fake, _autograd)


def dwconv_gelu_gate_compiled(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``gelu(a) * b`` of the depthwise convolution with the C++ (CPU) or CUDA kernel of x's device.

    Arguments as ``moce_kernels.dwconv_gelu_gate`` (which validates them first). Returns
    [B, Ch, H, W] contiguous in x's dtype. Raises RuntimeError when the kernels of x's device
    are not built.
    """
    _extension.require("cuda" if x.is_cuda else "cpu")
    return torch.ops.moce.dwconv_gelu_gate_fwd(
        x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()
    )
