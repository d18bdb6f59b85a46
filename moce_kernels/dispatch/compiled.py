"""``dispatch`` on the compiled kernels: ``torch.ops.moce.dispatch_fwd`` / ``_bwd``.

The ops and their CPU and CUDA kernels live in ``csrc/`` (``moce_kernels._C``); this module adds
what torch needs around them: fake (meta) implementations for torch.compile and the autograd
formula (``_autograd.py``, shared with the Triton op), registered once per process. The forward
moves rows as bytes, so ``x`` may have any dtype; the backward (float dtypes) is a gather that
sums each image's k rows in a fixed order.
"""

from __future__ import annotations

import torch

from moce_kernels import _extension, _library
from moce_kernels.dispatch import _autograd
from moce_kernels.route.reference import RoutingPlan

_extension.require("cpu")  # raises RuntimeError (saying how to build it) when not built


def _fwd_fake(x, sorted_images, inverse):
    torch._check(x.dim() >= 1, lambda: "x must be [B, ...]")
    return x.new_empty((sorted_images.shape[0], *x.shape[1:]))  # [S, ...]


def _bwd_fake(grad_out, inverse, batch):
    return grad_out.new_empty((batch, *grad_out.shape[1:]))  # [B, ...]


_library.register_compiled("dispatch", _fwd_fake, _bwd_fake, _autograd)


def dispatch_compiled(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Gather ``x`` into the plan's expert order with the C++ (CPU) or CUDA kernel of x's device.

    Arguments as ``moce_kernels.dispatch`` (which validates them first). Returns [B * k, ...]
    contiguous in x's dtype; differentiable in x (float dtypes). Raises RuntimeError when the
    kernels of x's device are not built, or (CPU) when a plan index is out of range.
    """
    _extension.require("cuda" if x.is_cuda else "cpu")
    return torch.ops.moce.dispatch_fwd(x.contiguous(), plan.sorted_images, plan.inverse)
