"""``dispatch`` on the compiled kernels: ``torch.ops.moce.dispatch_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula, registered once per process. The forward moves rows as bytes, so ``x`` may have any
dtype; the backward (float dtypes) is a gather that sums each image's k rows in a fixed order.
"""

from __future__ import annotations

import torch

from moce_kernels import _extension
from moce_kernels.route.reference import RoutingPlan

_C = _extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _fwd_fake(x, sorted_images, inverse):
    torch._check(x.dim() >= 1, lambda: "x must be [B, ...]")
    return x.new_empty((sorted_images.shape[0], *x.shape[1:]))  # [S, ...]


def _bwd_fake(grad_out, inverse, batch):
    return grad_out.new_empty((batch, *grad_out.shape[1:]))  # [B, ...]


def _setup_context(ctx, inputs, output) -> None:
    x, _sorted_images, inverse = inputs
    ctx.save_for_backward(inverse)
    ctx.batch = x.shape[0]


def _backward(ctx, grad_out):
    (inverse,) = ctx.saved_tensors
    grad_x = torch.ops.moce.dispatch_bwd(grad_out.contiguous(), inverse, ctx.batch)
    return grad_x, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "moce::dispatch: double backward (differentiating the gradient) is not supported by the "
        "compiled kernels; use backend='reference'"
    )


def _register() -> None:
    # The flag lives on the extension module, which is never re-imported, so reloading this file
    # does not register twice.
    if getattr(_C, "_dispatch_registered", False):
        return
    torch.library.register_fake("moce::dispatch_fwd", _fwd_fake)
    torch.library.register_fake("moce::dispatch_bwd", _bwd_fake)
    torch.library.register_autograd("moce::dispatch_fwd", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "moce::dispatch_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )
    _C._dispatch_registered = True


_register()


def dispatch_compiled(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Gather ``x`` into the plan's expert order with the C++ (CPU) or CUDA kernel of x's device.

    Arguments as ``moce_kernels.dispatch`` (which validates them first). Returns [B * k, ...]
    contiguous in x's dtype; differentiable in x (float dtypes). Raises RuntimeError when the
    kernels of x's device are not built, or (CPU) when a plan index is out of range.
    """
    _extension.require("cuda" if x.is_cuda else "cpu")
    return torch.ops.moce.dispatch_fwd(x.contiguous(), plan.sorted_images, plan.inverse)
