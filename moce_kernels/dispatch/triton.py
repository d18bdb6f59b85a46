"""``dispatch`` in Triton: gather images into the plan's expert order, one pass each way.

The features of a row are handled as one flat run of F elements in memory order, so x may be
[B, ...] of any trailing shape; contiguous and channels_last (4-d) inputs are used in place, any
other layout is copied to contiguous first. The output keeps that layout.

- forward: program (row i, chunk c) copies ``x[sorted_images[i], chunk]`` into row i with
  vector loads (each output element written once);
- backward: program (image b, chunk c) sums the k rows of image b, located through
  ``plan.inverse``, in the fixed order j = 0..k-1 in float32 (float64 for float64): a gather,
  deterministic, no atomics.

The (row, chunk) programs are numbered on a 1-d grid (``_triton_common.row_chunk``): CUDA caps
a grid's second dimension at 65535, which chunks (an image of over 268M elements) or rows (over
65535 slots) would pass.

Indices outside the tensor (a corrupted plan; the plan's values are not checked on the host,
that would sync) are never dereferenced: the rows they name read as NaN (floating dtypes) or 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moce_kernels import _library
from moce_kernels._triton_common import row_block, row_chunk
from moce_kernels.dispatch import _autograd
from moce_kernels.route.reference import RoutingPlan

#: dtypes the kernels load natively; any other dtype is copied as raw bytes.
_NATIVE = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
)
_ACC = {torch.float64: tl.float64}


@triton.jit
def dispatch_fwd_kernel(
    x_ptr,  # [B, F]
    sorted_images_ptr,  # [S] integer
    out_ptr,  # [S, F]
    B,
    F,
    NUM_CHUNKS,
    IS_FLOAT: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    row, chunk = row_chunk(NUM_CHUNKS)
    cols = chunk * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < F
    image = tl.load(sorted_images_ptr + row).to(tl.int64)
    ok = (image >= 0) & (image < B)
    image = tl.where(ok, image, 0)
    vals = tl.load(x_ptr + image * F + cols, mask=col_ok & ok, other=0)
    if IS_FLOAT:
        # A float32 NaN cast to the element type (the interpreter has no bf16 scalar constants).
        nan = tl.full([BLOCK_F], float("nan"), tl.float32).to(vals.dtype)
        vals = tl.where(ok, vals, nan)
    tl.store(out_ptr + row * F + cols, vals, mask=col_ok)


@triton.jit
def dispatch_bwd_kernel(
    grad_out_ptr,  # [S, F] float
    inverse_ptr,  # [S] integer: the sorted row of slot b * K + j
    grad_x_ptr,  # [B, F] float
    S,
    F,
    K,
    NUM_CHUNKS,
    ACC: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    image, chunk = row_chunk(NUM_CHUNKS)
    cols = chunk * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < F
    acc = tl.zeros([BLOCK_F], dtype=ACC)
    for j in range(K):
        row = tl.load(inverse_ptr + image * K + j).to(tl.int64)
        ok = (row >= 0) & (row < S)
        row = tl.where(ok, row, 0)
        vals = tl.load(grad_out_ptr + row * F + cols, mask=col_ok & ok, other=0.0).to(ACC)
        acc += tl.where(ok, vals, float("nan"))
    tl.store(grad_x_ptr + image * F + cols, acc.to(grad_x_ptr.dtype.element_ty), mask=col_ok)


# --- launchers ------------------------------------------------------------------------------


def dispatch_fwd(x: torch.Tensor, sorted_images: torch.Tensor) -> torch.Tensor:
    """[S, F] rows ``x[sorted_images]`` of a contiguous [B, F] tensor."""
    batch, features = x.shape
    slots = sorted_images.shape[0]
    out = torch.empty(slots, features, dtype=x.dtype, device=x.device)
    if slots == 0 or features == 0:
        return out
    src, dst = x, out
    if x.dtype not in _NATIVE:
        # bool, complex, float8, uint16..64: a copy is a copy, move the raw bytes.
        src, dst = x.view(torch.uint8), out.view(torch.uint8)
    block, warps = row_block(src.shape[1])
    chunks = triton.cdiv(src.shape[1], block)
    dispatch_fwd_kernel[(slots * chunks,)](
        src,
        sorted_images,
        dst,
        batch,
        src.shape[1],
        chunks,
        IS_FLOAT=src.dtype.is_floating_point,
        BLOCK_F=block,
        num_warps=warps,
    )
    return out


def dispatch_bwd(grad_out: torch.Tensor, inverse: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, F]: each image's gradient, the sum of its k rows of a contiguous [S, F] grad_out."""
    slots, features = grad_out.shape
    grad_x = torch.empty(batch, features, dtype=grad_out.dtype, device=grad_out.device)
    if batch == 0 or features == 0:
        return grad_x
    block, warps = row_block(features)
    chunks = triton.cdiv(features, block)
    dispatch_bwd_kernel[(batch * chunks,)](
        grad_out,
        inverse,
        grad_x,
        slots,
        features,
        slots // batch,
        chunks,
        ACC=_ACC.get(grad_out.dtype, tl.float32),
        BLOCK_F=block,
        num_warps=warps,
    )
    return grad_x


# --- torch.library registration --------------------------------------------------------------
# custom_op + register_fake rather than triton_op: see moce_kernels/_library.py.


def _dispatch_fwd_impl(x: torch.Tensor, sorted_images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return dispatch_fwd(x.contiguous(), sorted_images.contiguous())


def _dispatch_fwd_fake(x, sorted_images, inverse):
    return x.new_empty(sorted_images.shape[0], x.shape[1])


def _dispatch_bwd_impl(grad_out: torch.Tensor, inverse: torch.Tensor, batch: int) -> torch.Tensor:
    return dispatch_bwd(grad_out.contiguous(), inverse.contiguous(), batch)


def _dispatch_bwd_fake(grad_out, inverse, batch):
    return grad_out.new_empty(batch, grad_out.shape[1])


_dispatch_fwd_op = _library.define_triton(
    "dispatch", _dispatch_fwd_impl, _dispatch_bwd_impl, _dispatch_fwd_fake, _dispatch_bwd_fake, _autograd
)


# --- public entry -----------------------------------------------------------------------------


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format]:
    """[N, ...] -> ([N, F] view in memory order, the layout to give results of the same shape).

    Contiguous and channels_last tensors are viewed in place; anything else is copied.
    """
    features = math.prod(t.shape[1:])
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], features), torch.channels_last
    return t.contiguous().view(t.shape[0], features), torch.contiguous_format


def from_rows(rows: torch.Tensor, like_shape: tuple[int, ...], layout: torch.memory_format) -> torch.Tensor:
    """Inverse of :func:`as_rows` for a result of ``rows.shape[0]`` rows shaped like ``like_shape[1:]``."""
    if layout == torch.channels_last:
        _, channels, height, width = like_shape
        return rows.view(rows.shape[0], height, width, channels).permute(0, 3, 1, 2)
    return rows.view(rows.shape[0], *like_shape[1:])


def check_plan_index(name: str, t: torch.Tensor, length: int) -> None:
    """A plan index tensor must be a 1-d integer tensor of ``length`` entries (host-side, no sync)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"plan.{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"plan.{name} must have shape ({length},) (B * k), got {tuple(t.shape)}")


def dispatch_triton(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """:func:`moce_kernels.dispatch` with the Triton kernels (``backend="triton"``).

    Arguments as ``dispatch`` (which validates them first): x [B, ...] of any dtype, plan for
    these B images. Returns [B * k, ...] in x's dtype and layout (contiguous, or channels_last for
    a channels_last 4-d x). Differentiable in x (gather backward, deterministic).

    Raises:
        TypeError / ValueError: plan index tensors of the wrong dtype or length.
    """
    slots = plan.batch_size * plan.k
    check_plan_index("sorted_images", plan.sorted_images, slots)
    check_plan_index("inverse", plan.inverse, slots)
    rows, layout = as_rows(x)
    out = _dispatch_fwd_op(rows, plan.sorted_images, plan.inverse)
    return from_rows(out, (slots, *x.shape[1:]), layout)
