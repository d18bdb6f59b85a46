"""``layernorm2d`` on the compiled kernels: ``torch.ops.moce.layernorm2d_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula, registered once per process.
"""

from __future__ import annotations

import torch

from moce_kernels import _extension

_C = _extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


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


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype
    # mean and rstd are by-products for the backward, not differentiable outputs.
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.moce.layernorm2d_bwd(
        grad_y.contiguous(), x, weight, mean, rstd
    )
    need_x, need_weight, need_bias, _ = ctx.needs_input_grad
    return (
        grad_x if need_x else None,
        grad_weight if need_weight else None,
        grad_bias.to(ctx.bias_dtype) if need_bias else None,
        None,
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "moce::layernorm2d: double backward (differentiating the gradient) is not supported by the "
        "compiled kernels; use backend='reference'"
    )


def _register() -> None:
    # The flag lives on the extension module, which is never re-imported, so reloading this file
    # (importlib.reload, a second import under another name) does not register twice.
    if getattr(_C, "_layernorm2d_registered", False):
        return
    torch.library.register_fake("moce::layernorm2d_fwd", _layernorm2d_fwd_fake)
    torch.library.register_fake("moce::layernorm2d_bwd", _layernorm2d_bwd_fake)
    torch.library.register_autograd("moce::layernorm2d_fwd", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "moce::layernorm2d_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )
    _C._layernorm2d_registered = True


_register()


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
