"""``layernorm2d`` in Triton: ``torch.ops.moce_triton.layernorm2d_fwd`` / ``_bwd``.

Layout: x is NCHW and contiguous, so for one image the H * W pixels of a channel are contiguous
and the C values of one pixel are H * W apart. A program owns a tile of BLOCK_P pixels of one
image and walks the channels: every load is a row of BLOCK_P contiguous elements (coalesced),
and the per-pixel reductions over C run across the rows of the tile. No transposes.

- C <= ``_SINGLE_TILE_MAX_C``: the whole [C, BLOCK_P] tile sits in registers, x is read once and
  y written once (two-pass mean / variance on the registers).
- Larger C: chunks of ``_LOOP_BLOCK_C`` channels; the statistics combine the chunks' means and
  centred sums of squares (Chan et al.), then a second sweep writes y.
Both take the statistics of x minus its channel-0 value, so |mean| >> std loses nothing.

Statistics and accumulation in float32 (float64 for float64 input, so gradcheck works); y in x's
dtype; weight and bias may have any float dtype (the model runs float32 activations with bf16
weights and, under autocast, bf16 activations with float32 weights).

Backward: grad x in one sweep per tile (two for the chunked path). Grad weight / grad bias are
deterministic without atomics: each program writes its tile's per-channel sums into a [tiles, C]
float32 buffer, which ``layernorm2d_reduce_kernel`` sums over the tiles in a fixed order.

Why ``torch.library.custom_op`` rather than ``triton_op``: under the Triton interpreter (CPU CI)
a ``triton_op`` fails ``opcheck`` and ``torch.compile`` (its fake path launches the kernel on fake
tensors); ``custom_op`` + ``register_fake`` passes both, at the price of Inductor treating the op
as opaque on a GPU.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.layernorm2d import _autograd

# Shared with the other Triton bindings (moce_kernels/_triton_common.py).
_acc_dtype = _triton_common.acc_dtype
_device_guard = _triton_common.device_guard
_empty = _triton_common.empty
_row_chunk = _triton_common.row_chunk

#: Widest C whose [C, BLOCK_P] tile is held in registers (x read once); wider C loops over chunks.
_SINGLE_TILE_MAX_C = 512
#: Channels per chunk when C is wider than ``_SINGLE_TILE_MAX_C``.
_LOOP_BLOCK_C = 64
#: Elements per program tile (BLOCK_C * BLOCK_P) when C allows; 16 per thread with 4 warps.
_TILE_ELEMENTS = 2048
#: The same under the Triton interpreter (CPU tests), which pays per program and per operation
#: rather than per element, and has no registers to run out of.
_INTERPRETER_TILE_ELEMENTS = 16384
#: Fewest pixels per tile: 16 contiguous float32 are 64 bytes, two full 32-byte sectors per row.
_MIN_BLOCK_P = 16


@triton.jit
def layernorm2d_fwd_kernel(
    x_ptr,  # [B, C, H*W]
    w_ptr,  # [C]
    b_ptr,  # [C]
    y_ptr,  # [B, C, H*W], x's dtype
    mean_ptr,  # [B, H*W], ACC
    rstd_ptr,  # [B, H*W], ACC
    C,
    HW,
    TILES,  # pixel tiles per image
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    ACC: tl.constexpr,
):
    batch, pid_p = _row_chunk(TILES)
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    pmask = pix < HW
    image = batch * C * HW
    chan = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    # Statistics of x - x[channel 0]: exact for |mean| >> std, where a plain float32 sum of
    # the x loses the low digits that the centring needs.
    shift = tl.load(x_ptr + image + pix, mask=pmask, other=0.0).to(ACC)  # [BLOCK_P]
    if SINGLE_TILE:
        cmask = chan < C
        mask = cmask[:, None] & pmask[None, :]
        offs = image + chan[:, None].to(tl.int64) * HW + pix[None, :]  # [BLOCK_C, BLOCK_P]
        xs = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift[None, :], 0.0)
        mean_s = tl.sum(xs, 0) / C  # [BLOCK_P]
        # Two-pass variance on the registers: exact centring, no E[x^2] - E[x]^2 cancellation.
        xc = tl.where(mask, xs - mean_s[None, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / C + eps)
        w = tl.load(w_ptr + chan, mask=cmask, other=0.0).to(ACC)
        b = tl.load(b_ptr + chan, mask=cmask, other=0.0).to(ACC)
        y = xc * rstd[None, :] * w[:, None] + b[:, None]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Chan's combination of per-chunk (count, mean, centred sum of squares) of x - shift.
        count = tl.zeros([BLOCK_P], dtype=ACC)
        mean_s = tl.zeros([BLOCK_P], dtype=ACC)
        m2 = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            cmask = (c0 + chan) < C
            mask = cmask[:, None] & pmask[None, :]
            offs = image + (c0 + chan[:, None]).to(tl.int64) * HW + pix[None, :]
            xs = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift[None, :], 0.0)
            n_chunk = tl.minimum(C - c0, BLOCK_C).to(ACC)
            chunk_mean = tl.sum(xs, 0) / n_chunk
            xc = tl.where(mask, xs - chunk_mean[None, :], 0.0)
            chunk_m2 = tl.sum(xc * xc, 0)
            total = count + n_chunk
            delta = chunk_mean - mean_s
            mean_s = mean_s + delta * (n_chunk / total)
            m2 = m2 + chunk_m2 + delta * delta * (count * n_chunk / total)
            count = total
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for c0 in range(0, C, BLOCK_C):
            cmask = (c0 + chan) < C
            mask = cmask[:, None] & pmask[None, :]
            offs = image + (c0 + chan[:, None]).to(tl.int64) * HW + pix[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            w = tl.load(w_ptr + c0 + chan, mask=cmask, other=0.0).to(ACC)
            b = tl.load(b_ptr + c0 + chan, mask=cmask, other=0.0).to(ACC)
            y = ((x - shift[None, :]) - mean_s[None, :]) * rstd[None, :] * w[:, None] + b[:, None]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    mean = shift + mean_s
    stat_offs = batch * HW + pix
    tl.store(mean_ptr + stat_offs, mean, mask=pmask)
    tl.store(rstd_ptr + stat_offs, rstd, mask=pmask)


@triton.jit
def layernorm2d_bwd_kernel(
    gy_ptr,  # [B, C, H*W], x's dtype
    x_ptr,  # [B, C, H*W]
    w_ptr,  # [C]
    mean_ptr,  # [B, H*W], ACC
    rstd_ptr,  # [B, H*W], ACC
    gx_ptr,  # [B, C, H*W], x's dtype
    part_w_ptr,  # [B * tiles, C], ACC: this tile's sum of gy * xhat per channel
    part_b_ptr,  # [B * tiles, C], ACC: this tile's sum of gy per channel
    C,
    HW,
    TILES,  # pixel tiles per image
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    ACC: tl.constexpr,
):
    batch, pid_p = _row_chunk(TILES)
    part_row = (batch * TILES + pid_p) * C
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pix < HW
    image = batch * C * HW
    chan = tl.arange(0, BLOCK_C)
    stat_offs = batch * HW + pix
    mean = tl.load(mean_ptr + stat_offs, mask=pmask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + stat_offs, mask=pmask, other=0.0).to(ACC)
    # grad x = rstd * (w*gy - mean_c(w*gy) - xhat * mean_c(w*gy*xhat)), xhat = (x - mean) * rstd.
    if SINGLE_TILE:
        cmask = chan < C
        mask = cmask[:, None] & pmask[None, :]
        offs = image + chan[:, None].to(tl.int64) * HW + pix[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + chan, mask=cmask, other=0.0).to(ACC)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        wgy = gy * w[:, None]
        mean_wgy_xhat = tl.sum(wgy * xhat, 0) / C
        mean_wgy = tl.sum(wgy, 0) / C
        gx = (wgy - xhat * mean_wgy_xhat[None, :] - mean_wgy[None, :]) * rstd[None, :]
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(part_w_ptr + part_row + chan, tl.sum(gy * xhat, 1), mask=cmask)
        tl.store(part_b_ptr + part_row + chan, tl.sum(gy, 1), mask=cmask)
    else:
        sum_wgy_xhat = tl.zeros([BLOCK_P], dtype=ACC)
        sum_wgy = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            cmask = (c0 + chan) < C
            mask = cmask[:, None] & pmask[None, :]
            offs = image + (c0 + chan[:, None]).to(tl.int64) * HW + pix[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
            w = tl.load(w_ptr + c0 + chan, mask=cmask, other=0.0).to(ACC)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
            wgy = gy * w[:, None]
            sum_wgy_xhat += tl.sum(wgy * xhat, 0)
            sum_wgy += tl.sum(wgy, 0)
        mean_wgy_xhat = sum_wgy_xhat / C
        mean_wgy = sum_wgy / C
        for c0 in range(0, C, BLOCK_C):
            cmask = (c0 + chan) < C
            mask = cmask[:, None] & pmask[None, :]
            offs = image + (c0 + chan[:, None]).to(tl.int64) * HW + pix[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC)
            w = tl.load(w_ptr + c0 + chan, mask=cmask, other=0.0).to(ACC)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
            wgy = gy * w[:, None]
            gx = (wgy - xhat * mean_wgy_xhat[None, :] - mean_wgy[None, :]) * rstd[None, :]
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            tl.store(part_w_ptr + part_row + c0 + chan, tl.sum(gy * xhat, 1), mask=cmask)
            tl.store(part_b_ptr + part_row + c0 + chan, tl.sum(gy, 1), mask=cmask)


@triton.jit
def layernorm2d_reduce_kernel(
    part_ptr,  # [R, C], ACC
    out_ptr,  # [C]
    R,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    # Column sums in a fixed order (row blocks in sequence, then one tree over BLOCK_R): the
    # same bits on every run, no atomics.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rows
        mask = (r < R)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + r[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, 0).to(out_ptr.dtype.element_ty), mask=cmask)


# --- host launchers ------------------------------------------------------------------------------


def _blocks(channels: int, pixels: int) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_P, SINGLE_TILE, num_warps) for C channels and H * W pixels.

    Fixed by the shape (no autotuning), so the per-tile partial sums of the backward, and with
    them the weight and bias gradients, are the same bits on every run.
    """
    block_c = triton.next_power_of_2(max(channels, 1))
    single = block_c <= _SINGLE_TILE_MAX_C
    if not single:
        block_c = _LOOP_BLOCK_C
    budget = _INTERPRETER_TILE_ELEMENTS if os.environ.get("TRITON_INTERPRET") == "1" else _TILE_ELEMENTS
    block_p = max(_MIN_BLOCK_P, budget // block_c)
    block_p = min(block_p, max(_MIN_BLOCK_P, triton.next_power_of_2(max(pixels, 1))))
    # About 8 elements of each [BLOCK_C, BLOCK_P] tensor per thread (16 for C = 512): no spills
    # on sm_90 (ptxas, float32 accumulation; the backward holds x, grad y and their products).
    num_warps = max(4, min(16, block_c * block_p // 256))
    return block_c, block_p, single, num_warps


def layernorm2d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [B, C, H, W] in x's dtype, mean and rstd [B, H, W] in float32 (float64 for float64 x)."""
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    B, C, H, W = x.shape
    acc_torch, acc_tl = _acc_dtype(x)
    y = _empty(x.shape, x.dtype, x.device)
    mean = _empty((B, H, W), acc_torch, x.device)
    rstd = _empty((B, H, W), acc_torch, x.device)
    if C == 0:
        # No channels to normalise: y is empty; the statistics are undefined.
        mean.fill_(math.nan)
        rstd.fill_(math.nan)
    if x.numel() == 0:
        return y, mean, rstd
    HW = H * W
    block_c, block_p, single, num_warps = _blocks(C, HW)
    tiles = triton.cdiv(HW, block_p)
    with _device_guard(x):
        layernorm2d_fwd_kernel[(B * tiles,)](
            x, weight, bias, y, mean, rstd, C, HW, tiles, float(eps),
            BLOCK_C=block_c, BLOCK_P=block_p, SINGLE_TILE=single, ACC=acc_tl, num_warps=num_warps,
        )  # fmt: skip
    return y, mean, rstd


def _column_sums(part: torch.Tensor, out: torch.Tensor, acc_tl: tl.dtype) -> None:
    rows, cols = part.shape
    block_c = min(64, triton.next_power_of_2(max(cols, 1)))
    block_r = 32
    layernorm2d_reduce_kernel[(triton.cdiv(cols, block_c),)](
        part, out, rows, cols, BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_tl, num_warps=4
    )


def layernorm2d_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x in x's dtype, grad weight, grad bias in weight's dtype); deterministic."""
    grad_y, x, weight = grad_y.contiguous(), x.contiguous(), weight.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    B, C, H, W = x.shape
    acc_torch, acc_tl = _acc_dtype(x)
    grad_x = _empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        # No pixels: nothing flows back to the parameters.
        return grad_x, torch.zeros_like(weight), torch.zeros_like(weight)
    HW = H * W
    block_c, block_p, single, num_warps = _blocks(C, HW)
    tiles = triton.cdiv(HW, block_p)
    part_w = _empty((B * tiles, C), acc_torch, x.device)
    part_b = _empty((B * tiles, C), acc_torch, x.device)
    grad_weight = _empty(weight.shape, weight.dtype, weight.device)
    grad_bias = _empty(weight.shape, weight.dtype, weight.device)
    with _device_guard(x):
        layernorm2d_bwd_kernel[(B * tiles,)](
            grad_y, x, weight, mean, rstd, grad_x, part_w, part_b, C, HW, tiles,
            BLOCK_C=block_c, BLOCK_P=block_p, SINGLE_TILE=single, ACC=acc_tl, num_warps=num_warps,
        )  # fmt: skip
        _column_sums(part_w, grad_weight, acc_tl)
        _column_sums(part_b, grad_bias, acc_tl)
    return grad_x, grad_weight, grad_bias


# --- torch.library registration ----------------------------------------------------------------


def _layernorm2d_fwd_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(x.dim() == 4, lambda: f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    B, _, H, W = x.shape
    acc = _acc_dtype(x)[0]
    y = x.new_empty(x.shape)  # contiguous, like the kernel's output
    return y, x.new_empty((B, H, W), dtype=acc), x.new_empty((B, H, W), dtype=acc)


def _layernorm2d_bwd_fake(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


_library.define_triton(
    "layernorm2d", layernorm2d_fwd, layernorm2d_bwd, _layernorm2d_fwd_fake, _layernorm2d_bwd_fake, _autograd
)


def layernorm2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over C of a [B, C, H, W] tensor with the Triton kernels (GPU, or the interpreter).

    Arguments as ``moce_kernels.layernorm2d`` (which validates them first); weight and bias [C]
    may have another float dtype than x. A non-contiguous x (channels_last, a slice) is copied to
    contiguous NCHW first. Returns y, [B, C, H, W] contiguous in x's dtype; differentiable in x,
    weight and bias (grad weight / grad bias deterministic, in their own dtypes).
    """
    y, _mean, _rstd = torch.ops.moce_triton.layernorm2d_fwd(
        x.contiguous(), weight.contiguous(), bias.contiguous(), float(eps)
    )
    return y
