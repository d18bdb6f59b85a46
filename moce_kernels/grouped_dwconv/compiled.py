"""``grouped_dwconv`` on the compiled kernels: ``torch.ops.moce.grouped_dwconv_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula (``_autograd.py``, shared with the Triton op), registered once per process.

The offsets stay a device tensor: the CUDA kernels find each row's expert on the device (no
host synchronisation); the CPU kernels check the offsets' values. Channels and kernel sizes are
host lists (``int[]`` in the schema). The CUDA kernels take at most 64 experts per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels import _extension, _library
from moce_kernels.grouped_dwconv import _autograd

_extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _fwd_fake(x, weight, bias, offsets, channels, kernel_sizes):
    torch._check(x.dim() == 4, lambda: f"x must be [N, C_max, H, W], got shape {tuple(x.shape)}")
    return x.new_empty(x.shape)  # [N, C_max, H, W], contiguous like the kernels' output


def _bwd_fake(grad_y, x, weight, offsets, channels, kernel_sizes):
    grad_bias = weight.new_empty((weight.shape[0], x.shape[1]))  # [E, C_max]
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_bias


_library.register_compiled("grouped_dwconv", _fwd_fake, _bwd_fake, _autograd)


def grouped_dwconv_compiled(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    channels: Sequence[int],
    kernel_sizes: Sequence[int],
) -> torch.Tensor:
    """Depthwise convolutions of E experts with the C++ (CPU) or CUDA kernel of x's device.

    Arguments as ``moce_kernels.grouped_dwconv`` (which validates them first); ``offsets`` is the
    [E + 1] device tensor. Returns [N, C_max, H, W] contiguous in x's dtype. Raises RuntimeError
    when the kernels of x's device are not built, or (CPU) when the offsets do not rise from 0 to N.
    """
    _extension.require("cuda" if x.is_cuda else "cpu")
    return torch.ops.moce.grouped_dwconv_fwd(
        x.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        offsets,
        [int(c) for c in channels],
        [int(k) for k in kernel_sizes],
    )
