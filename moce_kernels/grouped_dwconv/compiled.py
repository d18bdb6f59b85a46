"""``grouped_dwconv`` on the compiled kernels: ``torch.ops.moce.grouped_dwconv_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula, registered once per process.

The offsets stay a device tensor: the CUDA kernels find each row's expert on the device (no
host synchronisation); the CPU kernels check the offsets' values. Channels and kernel sizes are
host lists (``int[]`` in the schema). The CUDA kernels take at most 64 experts per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels import _extension

_C = _extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _fwd_fake(x, weight, bias, offsets, channels, kernel_sizes):
    torch._check(x.dim() == 4, lambda: f"x must be [N, C_max, H, W], got shape {tuple(x.shape)}")
    return x.new_empty(x.shape)  # [N, C_max, H, W], contiguous like the kernels' output


def _bwd_fake(grad_y, x, weight, offsets, channels, kernel_sizes):
    grad_bias = weight.new_empty((weight.shape[0], x.shape[1]))  # [E, C_max]
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, offsets, channels, kernel_sizes = inputs
    ctx.save_for_backward(x, weight, offsets)
    ctx.channels = list(channels)
    ctx.kernel_sizes = list(kernel_sizes)


def _backward(ctx, grad_y):
    x, weight, offsets = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.moce.grouped_dwconv_bwd(
        grad_y.contiguous(), x, weight, offsets, ctx.channels, ctx.kernel_sizes
    )
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (
        grad_x if need_x else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None,
        None,
        None,
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "moce::grouped_dwconv: double backward (differentiating the gradient) is not supported by the "
        "compiled kernels; use backend='reference'"
    )


def _register() -> None:
    # The flag lives on the extension module, which is never re-imported, so reloading this file
    # does not register twice.
    if getattr(_C, "_grouped_dwconv_registered", False):
        return
    torch.library.register_fake("moce::grouped_dwconv_fwd", _fwd_fake)
    torch.library.register_fake("moce::grouped_dwconv_bwd", _bwd_fake)
    torch.library.register_autograd("moce::grouped_dwconv_fwd", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "moce::grouped_dwconv_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )
    _C._grouped_dwconv_registered = True


_register()


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
