"""``dispatch_pointwise`` in Triton: ``torch.ops.moce_triton.dispatch_pointwise_fwd`` / ``_bwd``.

The grouped GEMM of ``grouped_pointwise`` (its kernels, with ``GATHER``): row n's program loads
its input tile from image ``sorted_images[n]`` of x instead of from a dispatched copy, so the
copy (B * k rows written, then read again) never exists.

Backward:
- grad x: each row's ``W_e^T grad_y[n]`` (the row kernel, transposed) and then, per image, the
  sum of its k rows in a fixed order (``dispatch``'s backward kernel: a gather, no atomics).
- grad weight / grad bias: ``grouped_pointwise``'s two deterministic stages, the first reading
  x through the same gather.
"""

from __future__ import annotations

import torch

from moce_kernels import _library, _triton_common
from moce_kernels.dispatch.triton import dispatch_bwd
from moce_kernels.dispatch_pointwise import _autograd
from moce_kernels.grouped_pointwise import triton as pointwise
from moce_kernels.route.reference import RoutingPlan


def dispatch_pointwise_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    sorted_images: torch.Tensor,
    inverse: torch.Tensor,
    in_channels: list[int],
    out_channels: list[int],
) -> torch.Tensor:
    """y [B * k, Cout_max, H, W] in x's dtype (see ``moce_kernels.dispatch_pointwise``)."""
    x, weight, offsets, sorted_images = (t.contiguous() for t in (x, weight, offsets, sorted_images))
    _, _, height, width = x.shape
    y = _triton_common.empty((sorted_images.shape[0], weight.shape[1], height, width), x.dtype, x.device)
    if y.numel() == 0:
        return y
    meta = _triton_common.expert_metadata(tuple(in_channels), tuple(out_channels), x.device)
    bias = None if bias is None else bias.contiguous()
    with _triton_common.device_guard(x):
        pointwise.launch_rows(x, weight, bias, offsets, meta, y, transpose=False, src=sorted_images)
    return y


def dispatch_pointwise_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    sorted_images: torch.Tensor,
    inverse: torch.Tensor,
    in_channels: list[int],
    out_channels: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x [B, Cin_max, H, W], grad weight [E, Cout_max, Cin_max], grad bias [E, Cout_max])."""
    grad_y, x, weight, offsets, sorted_images, inverse = (
        t.contiguous() for t in (grad_y, x, weight, offsets, sorted_images, inverse)
    )
    batch, c_in, height, width = x.shape
    rows = grad_y.shape[0]
    if rows * height * width == 0:
        grad_x = torch.zeros_like(x)
        return grad_x, *pointwise.weight_grads(grad_y, x, weight, offsets, None)
    meta = _triton_common.expert_metadata(tuple(in_channels), tuple(out_channels), x.device)
    grad_rows = _triton_common.empty((rows, c_in, height, width), x.dtype, x.device)
    with _triton_common.device_guard(x):
        pointwise.launch_rows(grad_y, weight, None, offsets, meta, grad_rows, transpose=True)
        grad_x = dispatch_bwd(grad_rows.view(rows, -1), inverse, batch).view(x.shape)
    return grad_x, *pointwise.weight_grads(grad_y, x, weight, offsets, meta, src=sorted_images)


# --- torch.library registration ----------------------------------------------------------------
# custom_op + register_fake rather than triton_op: see moce_kernels/_library.py.


def _dispatch_pointwise_fwd_fake(x, weight, bias, offsets, sorted_images, inverse, in_channels, out_channels):
    return x.new_empty((sorted_images.shape[0], weight.shape[1], x.shape[2], x.shape[3]))


def _dispatch_pointwise_bwd_fake(
    grad_y, x, weight, offsets, sorted_images, inverse, in_channels, out_channels
):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[:2])


_library.define_triton(
    "dispatch_pointwise",
    dispatch_pointwise_fwd,
    dispatch_pointwise_bwd,
    _dispatch_pointwise_fwd_fake,
    _dispatch_pointwise_bwd_fake,
    _autograd,
)


def dispatch_pointwise_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: RoutingPlan,
    in_channels: list[int],
    out_channels: list[int],
) -> torch.Tensor:
    """The experts' 1x1 convolutions of the dispatched images in one Triton launch, reading x in
    place. Arguments as ``moce_kernels.dispatch_pointwise`` (which validates them first); the plan
    is never read on the host. Returns [B * k, Cout_max, H, W] contiguous in x's dtype.
    """
    return torch.ops.moce_triton.dispatch_pointwise_fwd(
        x.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        plan.offsets.contiguous(),
        plan.sorted_images.contiguous(),
        plan.inverse.contiguous(),
        list(in_channels),
        list(out_channels),
    )
