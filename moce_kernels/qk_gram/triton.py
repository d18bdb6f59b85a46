"""``qk_gram`` in Triton: ``torch.ops.moce_triton.qk_gram_fwd`` / ``_bwd``.

Channel attention's inner dimension is every pixel of an image (N = H * W, 262,144 at 512 x 512)
while its maps are only [D, D] (D = 32 in MoCE-IR). A batched ``q @ k^T`` of that shape gives a
GPU few output tiles and a long reduction, and the normalisation before it reads q and k twice
more and writes them back. Here the reduction over N is split instead:

- ``qk_gram_partial_kernel``: a program per (image and head, [BLOCK_D, BLOCK_D] tile of the map,
  split of N) walks its split in BLOCK_N-pixel steps, loads the q rows and k rows of its tile
  (coalesced along the pixels; any batch / head / row strides, the pixels contiguous), and
  accumulates ``tl.dot(q, k^T)`` and, in the programs of the first tile column / row, the rows'
  sums of squares, in float32 (float64 for float64 input). Each split writes its partial sums;
  ``torch.sum`` adds the splits in a fixed order. The number of splits is fixed by the shape and
  the GPU's multiprocessor count, so the bits are the same on every run on that GPU. q and k are
  read once (once per tile row / column when D > BLOCK_D).
- ``qk_gram_bwd_kernel``: a program per (image and head, tile of D rows, BLOCK_N pixels) writes
  ``grad_q = grad_gram @ k + 2 q grad_q_sq`` and ``grad_k = grad_gram^T @ q + 2 k grad_k_sq`` for
  its rows, with grad_gram's tiles in float32: no atomics.

float32 products use ``input_precision="ieee"`` (no TF32); float64 multiplies broadcast tiles
(``grouped_pointwise``'s ``mma``). ``custom_op`` rather than ``triton_op``: see
``moce_kernels/layernorm2d/triton.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.grouped_pointwise.triton import mma
from moce_kernels.qk_gram import _autograd

_acc_dtype = _triton_common.acc_dtype
_device_guard = _triton_common.device_guard
_empty = _triton_common.empty
_interpreted = _triton_common.interpreted
_row_chunk = _triton_common.row_chunk

#: Widest map tile (ptxas on sm_90, Triton 3.6, 8 warps: no spills with these tiles). The
#: forward's stacked 16-bit product takes D = 64 (MoCE-IR's widest head) in one tile (~200
#: registers): one read of q and k, where [32, 32] tiles would read each twice.
_BLOCK_D = 32
_STACKED_BLOCK_D = 64
#: tl.dot's smallest operand side.
_MIN_DOT = 16
#: Pixels per step. 16-bit inputs (the stacked [2 BLOCK_D, 64] tile on wgmma): ~110 registers;
#: float32 ([32, 128] tiles, IEEE products on the CUDA cores): ~180; the backward's [32, 128].
_STACKED_BLOCK_N = 64
_BLOCK_N = 128
_NUM_WARPS = 8
#: Programs the forward aims for per multiprocessor (splits of N fill the GPU when B * heads
#: is small, as for one image).
_PROGRAMS_PER_SM = 2
#: Under the Triton interpreter: big steps (it pays per operation, not per element) and a few
#: programs, so that a test's N is still split.
_INTERPRETER_BLOCK_N = 256
_INTERPRETER_PROGRAMS = 4
#: float64 (gradcheck) multiplies [BLOCK_D, BLOCK_N, BLOCK_D] broadcast tiles: small ones.
_FP64_BLOCK_D = 16
_FP64_BLOCK_N = 16


@triton.jit
def qk_gram_partial_kernel(
    q_ptr, k_ptr,  # [B, HEADS, D, N], pixels contiguous
    gram_ptr,  # [B * HEADS, SPLITS, D, D], ACC
    q_sq_ptr, k_sq_ptr,  # [B * HEADS, SPLITS, D], ACC
    HEADS, D, N, q_sb, q_sh, q_sd, k_sb, k_sh, k_sd, SPLITS, STEPS_PER_SPLIT, TILES,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STACKED: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # 1-d grid, split-major (CUDA caps a grid's second dimension at 65535).
    split, pid = _row_chunk(tl.num_programs(0) // SPLITS)
    pid = pid.to(tl.int32)
    split = split.to(tl.int32)
    bh = pid // (TILES * TILES)
    tile = pid - bh * TILES * TILES
    ti = tile // TILES
    tj = tile - ti * TILES
    b = (bh // HEADS).to(tl.int64)
    h = (bh - (bh // HEADS) * HEADS).to(tl.int64)
    part = bh.to(tl.int64) * SPLITS + split
    ns = tl.arange(0, BLOCK_N)
    n_begin = split.to(tl.int64) * STEPS_PER_SPLIT * BLOCK_N
    if STACKED:
        # One [2 BLOCK_D, BLOCK_N] tile x = [q rows of tile ti; k rows of tile tj] per step and
        # x @ x^T: its off-diagonal block is q k^T, its diagonal the squared norms. The loads
        # feed the product only, and 2 * BLOCK_D >= 64 rows put it on the tensor cores (wgmma).
        r2 = tl.arange(0, 2 * BLOCK_D)
        is_k = r2 >= BLOCK_D
        rows = tl.where(is_k, tj * BLOCK_D + r2 - BLOCK_D, ti * BLOCK_D + r2)
        ok = rows < D
        q_rows = q_ptr + b * q_sb + h * q_sh + rows.to(tl.int64) * q_sd
        k_rows = k_ptr + b * k_sb + h * k_sh + rows.to(tl.int64) * k_sd
        x_rows = tl.where(is_k, k_rows, q_rows)
        acc = tl.zeros([2 * BLOCK_D, 2 * BLOCK_D], dtype=ACC)
        for step in range(0, STEPS_PER_SPLIT):
            n = n_begin + step * BLOCK_N + ns
            x = tl.load(x_rows[:, None] + n[None, :], mask=ok[:, None] & (n < N)[None, :], other=0.0)
            acc = mma(acc, x, tl.trans(x), USE_DOT, DOT_UPCAST)
        gram_mask = (ok & ~is_k)[:, None] & (ok & is_k)[None, :]
        tl.store(gram_ptr + part * D * D + rows[:, None] * D + rows[None, :], acc, mask=gram_mask)
        diag = tl.sum(tl.where(r2[:, None] == r2[None, :], acc, 0.0), 1)
        # The first tile column has every q row's full sum, the first tile row every k row's.
        if tj == 0:
            tl.store(q_sq_ptr + part * D + rows, diag, mask=ok & ~is_k)
        if ti == 0:
            tl.store(k_sq_ptr + part * D + rows, diag, mask=ok & is_k)
    else:
        # float32 / float64: q k^T alone (the stacked product's extra blocks would cost CUDA-core
        # FMAs here) and the squares summed on the side.
        rows_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
        rows_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
        ok_i = rows_i < D
        ok_j = rows_j < D
        q_rows = q_ptr + b * q_sb + h * q_sh + rows_i.to(tl.int64) * q_sd
        k_rows = k_ptr + b * k_sb + h * k_sh + rows_j.to(tl.int64) * k_sd
        acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=ACC)
        q_sq = tl.zeros([BLOCK_D], dtype=ACC)
        k_sq = tl.zeros([BLOCK_D], dtype=ACC)
        for step in range(0, STEPS_PER_SPLIT):
            n = n_begin + step * BLOCK_N + ns
            n_ok = n < N
            q = tl.load(q_rows[:, None] + n[None, :], mask=ok_i[:, None] & n_ok[None, :], other=0.0)
            k = tl.load(k_rows[:, None] + n[None, :], mask=ok_j[:, None] & n_ok[None, :], other=0.0)
            acc = mma(acc, q, tl.trans(k), USE_DOT, DOT_UPCAST)
            qf = q.to(ACC)
            kf = k.to(ACC)
            q_sq += tl.sum(qf * qf, 1)
            k_sq += tl.sum(kf * kf, 1)
        gram_tile = gram_ptr + part * D * D + rows_i[:, None] * D + rows_j[None, :]
        tl.store(gram_tile, acc, mask=ok_i[:, None] & ok_j[None, :])
        if tj == 0:
            tl.store(q_sq_ptr + part * D + rows_i, q_sq, mask=ok_i)
        if ti == 0:
            tl.store(k_sq_ptr + part * D + rows_j, k_sq, mask=ok_j)


@triton.jit
def qk_gram_bwd_kernel(
    grad_gram_ptr,  # [B * HEADS, D, D], ACC
    grad_q_sq_ptr, grad_k_sq_ptr,  # [B * HEADS, D], ACC
    q_ptr, k_ptr,  # [B, HEADS, D, N], pixels contiguous
    grad_q_ptr, grad_k_ptr,  # [B * HEADS, D, N], q's dtype
    HEADS, D, N, q_sb, q_sh, q_sd, k_sb, k_sh, k_sd, TILES, N_BLOCKS,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_DOT: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # 1-d grid of (image, head, row tile) x N_BLOCKS pixel blocks: an 8K image has 260K blocks,
    # past CUDA's 65535 on a grid's second dimension.
    pid, n_block = _row_chunk(N_BLOCKS)
    pid = pid.to(tl.int32)
    bh = pid // TILES
    tr = pid - bh * TILES
    b = (bh // HEADS).to(tl.int64)
    h = (bh - (bh // HEADS) * HEADS).to(tl.int64)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = tr * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = rows < D
    q_base = q_ptr + b * q_sb + h * q_sh
    k_base = k_ptr + b * k_sb + h * k_sh
    g_base = grad_gram_ptr + bh.to(tl.int64) * D * D
    mask_r = r_ok[:, None] & n_ok[None, :]
    q_r = tl.load(q_base + rows.to(tl.int64)[:, None] * q_sd + n[None, :], mask=mask_r, other=0.0).to(ACC)
    k_r = tl.load(k_base + rows.to(tl.int64)[:, None] * k_sd + n[None, :], mask=mask_r, other=0.0).to(ACC)
    g_q = tl.load(grad_q_sq_ptr + bh.to(tl.int64) * D + rows, mask=r_ok, other=0.0).to(ACC)
    g_k = tl.load(grad_k_sq_ptr + bh.to(tl.int64) * D + rows, mask=r_ok, other=0.0).to(ACC)
    acc_q = 2.0 * q_r * g_q[:, None]
    acc_k = 2.0 * k_r * g_k[:, None]
    for tc in range(0, TILES):
        cols = tc * BLOCK_D + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        mask_c = c_ok[:, None] & n_ok[None, :]
        k_c = tl.load(k_base + cols.to(tl.int64)[:, None] * k_sd + n[None, :], mask=mask_c, other=0.0)
        q_c = tl.load(q_base + cols.to(tl.int64)[:, None] * q_sd + n[None, :], mask=mask_c, other=0.0)
        mask_g = r_ok[:, None] & c_ok[None, :]
        # grad_gram[rows, cols] for grad q; grad_gram[cols, rows]^T (read transposed) for grad k.
        g_rc = tl.load(g_base + rows[:, None] * D + cols[None, :], mask=mask_g, other=0.0).to(ACC)
        g_cr_t = tl.load(g_base + cols[None, :] * D + rows[:, None], mask=mask_g, other=0.0).to(ACC)
        if SPLIT_DOT:
            # 16-bit inputs: grad_gram as a sum of two 16-bit parts, so both products run on the
            # tensor cores and still carry ~16 bits of grad_gram's mantissa (float32 products of
            # the float32 tile spill on sm_90).
            g_hi = g_rc.to(k_c.dtype)
            acc_q = mma(acc_q, g_hi, k_c, USE_DOT, DOT_UPCAST)
            acc_q = mma(acc_q, (g_rc - g_hi.to(ACC)).to(k_c.dtype), k_c, USE_DOT, DOT_UPCAST)
            g_hi = g_cr_t.to(q_c.dtype)
            acc_k = mma(acc_k, g_hi, q_c, USE_DOT, DOT_UPCAST)
            acc_k = mma(acc_k, (g_cr_t - g_hi.to(ACC)).to(q_c.dtype), q_c, USE_DOT, DOT_UPCAST)
        else:
            acc_q = mma(acc_q, g_rc, k_c.to(ACC), USE_DOT, True)
            acc_k = mma(acc_k, g_cr_t, q_c.to(ACC), USE_DOT, True)
    out = bh.to(tl.int64) * D * N + rows.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(grad_q_ptr + out, acc_q.to(grad_q_ptr.dtype.element_ty), mask=mask_r)
    tl.store(grad_k_ptr + out, acc_k.to(grad_k_ptr.dtype.element_ty), mask=mask_r)


# --- host launchers ------------------------------------------------------------------------------


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(d: int, dtype: torch.dtype, *, backward: bool = False) -> dict:
    """Tiles of the kernels for maps of side ``d``: BLOCK_D, BLOCK_N, num_warps, and for 16-bit
    inputs STACKED (the forward's stacked product) or SPLIT_DOT (the backward's split products)."""
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    if dtype == torch.float64:
        block_d, block_n, smallest = _FP64_BLOCK_D, _FP64_BLOCK_N, 1
    else:
        stacked = sixteen_bit and not backward
        block_d, smallest = (_STACKED_BLOCK_D if stacked else _BLOCK_D), _MIN_DOT
        block_n = _STACKED_BLOCK_N if stacked else _BLOCK_N
        if _interpreted():
            block_n = _INTERPRETER_BLOCK_N
    config = dict(
        BLOCK_D=max(smallest, min(block_d, triton.next_power_of_2(max(d, 1)))),
        BLOCK_N=block_n,
        num_warps=_NUM_WARPS,
    )
    config["SPLIT_DOT" if backward else "STACKED"] = sixteen_bit
    return config


def _splits(programs: int, steps: int, device: torch.device) -> tuple[int, int]:
    """(splits, steps per split) of N's ``steps`` BLOCK_N-pixel steps, for ``programs`` programs
    per split: enough splits to give each multiprocessor ``_PROGRAMS_PER_SM`` programs."""
    if _interpreted() or device.type != "cuda":
        target = _INTERPRETER_PROGRAMS
    else:
        target = _PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None else 0)
    splits = max(1, min(steps, triton.cdiv(target, max(programs, 1))))
    per_split = triton.cdiv(steps, splits)
    return triton.cdiv(steps, per_split), per_split


def _pixel_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t with contiguous pixels (a copy only when they are not), and its B / head / row strides."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(2))


def gram_partials(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The forward kernel's per-split sums: (gram [B * heads, SPLITS, D, D], q_sq, k_sq
    [B * heads, SPLITS, D]) in the accumulation dtype, to be added over dimension 1 in order; None
    when there is nothing to sum (no image, head or pixel: the sums are zeros)."""
    B, heads, D, N = q.shape
    acc_torch, acc_tl = _acc_dtype(q, k)
    q, q_strides = _pixel_strides(q)
    k, k_strides = _pixel_strides(k)
    config = _config(D, q.dtype)
    tiles = triton.cdiv(D, config["BLOCK_D"])
    programs = B * heads * tiles * tiles
    if programs == 0 or N == 0:
        return None
    splits, per_split = _splits(programs, triton.cdiv(N, config["BLOCK_N"]), q.device)
    gram = _empty((B * heads, splits, D, D), acc_torch, q.device)
    q_sq = _empty((B * heads, splits, D), acc_torch, q.device)
    k_sq = _empty((B * heads, splits, D), acc_torch, q.device)
    with _device_guard(q):
        qk_gram_partial_kernel[(splits * programs,)](
            q, k, gram, q_sq, k_sq, heads, D, N, *q_strides, *k_strides, splits, per_split, tiles,
            USE_DOT=q.dtype != torch.float64, DOT_UPCAST=_interpreted() and q.dtype == torch.bfloat16,
            ACC=acc_tl, **config,
        )  # fmt: skip
    return gram, q_sq, k_sq


def qk_gram_fwd(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gram [B, heads, D, D], q_sq, k_sq [B, heads, D]) in the accumulation dtype."""
    B, heads, D, _ = q.shape
    partials = gram_partials(q, k)
    if partials is None:
        zeros = functools.partial(torch.zeros, dtype=_acc_dtype(q, k)[0], device=q.device)
        return zeros((B, heads, D, D)), zeros((B, heads, D)), zeros((B, heads, D))
    gram, q_sq, k_sq = partials
    if gram.shape[1] > 1:
        with _device_guard(q):
            gram, q_sq, k_sq = gram.sum(1), q_sq.sum(1), k_sq.sum(1)
    return gram.view(B, heads, D, D), q_sq.view(B, heads, D), k_sq.view(B, heads, D)


def qk_gram_bwd(
    grad_gram: torch.Tensor,
    grad_q_sq: torch.Tensor,
    grad_k_sq: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad q, grad k), [B, heads, D, N] contiguous in q's dtype."""
    B, heads, D, N = q.shape
    acc_torch, acc_tl = _acc_dtype(q, k)
    q, q_strides = _pixel_strides(q)
    k, k_strides = _pixel_strides(k)
    grad_q = _empty(q.shape, q.dtype, q.device)
    grad_k = _empty(k.shape, k.dtype, k.device)
    config = _config(D, q.dtype, backward=True)
    tiles = triton.cdiv(D, config["BLOCK_D"])
    if grad_q.numel() == 0:
        return grad_q, grad_k
    grad_gram, grad_q_sq, grad_k_sq = (
        g.to(acc_torch).contiguous() for g in (grad_gram, grad_q_sq, grad_k_sq)
    )
    n_blocks = triton.cdiv(N, config["BLOCK_N"])
    with _device_guard(q):
        qk_gram_bwd_kernel[(B * heads * tiles * n_blocks,)](
            grad_gram, grad_q_sq, grad_k_sq, q, k, grad_q, grad_k, heads, D, N, *q_strides,
            *k_strides, tiles, n_blocks, USE_DOT=q.dtype != torch.float64,
            DOT_UPCAST=_interpreted() and q.dtype == torch.bfloat16, ACC=acc_tl, **config,
        )  # fmt: skip
    return grad_q, grad_k


# --- torch.library registration ----------------------------------------------------------------


def _qk_gram_fwd_fake(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, heads, D, _ = q.shape
    acc = _acc_dtype(q, k)[0]
    return (
        q.new_empty((B, heads, D, D), dtype=acc),
        q.new_empty((B, heads, D), dtype=acc),
        q.new_empty((B, heads, D), dtype=acc),
    )


def _qk_gram_bwd_fake(
    grad_gram: torch.Tensor,
    grad_q_sq: torch.Tensor,
    grad_k_sq: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


_library.define_triton("qk_gram", qk_gram_fwd, qk_gram_bwd, _qk_gram_fwd_fake, _qk_gram_bwd_fake, _autograd)


def qk_gram_triton(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moce_kernels.qk_gram`` with the Triton kernels (a GPU, or the interpreter); arguments
    validated by the public function."""
    return torch.ops.moce_triton.qk_gram_fwd(q, k)
