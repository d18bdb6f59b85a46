"""``channel_attention_map`` in Triton: ``torch.ops.moce_triton.channel_attention_map_fwd`` /
``_bwd``.

The forward is ``qk_gram``'s partial kernel (q k^T and both squared norms, the pixels split over
the GPU) and ``attention_map_fwd_kernel``: a program per (image and head, tile of map rows) adds
the splits' partial sums in order, divides by the norms, scales by the head's temperature and
takes each row's softmax, and writes the map and the sums (kept for the backward). The
backward's ``attention_map_bwd_kernel`` turns the map's gradient into those of the sums and the
temperature (per program; added over the images on the host), and ``qk_gram``'s backward kernel
those into q's and k's. The maps are [D, D] with D = 32..64 in MoCE-IR: a program holds whole rows,
as many as fit in its tile. ``custom_op`` rather than ``triton_op``: see
``moce_kernels/layernorm2d/triton.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.channel_attention_map import _autograd
from moce_kernels.channel_attention_map.reference import EPS
from moce_kernels.qk_gram.triton import gram_partials, qk_gram_bwd

_acc_dtype = _triton_common.acc_dtype
_device_guard = _triton_common.device_guard
_empty = _triton_common.empty
_row_chunk = _triton_common.row_chunk

#: Elements of a program's [BLOCK_R, BLOCK_D] tile of the map: 8 float32 per thread over 8
#: warps, ~80 registers a thread in both kernels (ptxas, sm_90; 4096 elements took 160, and on 4
#: warps 255 with a spilling backward). D = 32 is one program per map, D = 64 two.
_TILE = 2048
_NUM_WARPS = 8
#: Widest map the kernels take: a row of the map lies in one program (4 KiB of float32 per
#: thread at this width; the Gram matrix alone is 1 GiB per image and head).
MAX_D = 16384


@triton.jit
def _eps(EPS: tl.constexpr, ACC: tl.constexpr):
    """EPS in ACC: a float argument or literal would be float32, and float32's 1e-12 is off
    float64's by 4e-9 relative (the gradient of an all-zero row is divided by it)."""
    return tl.full([], EPS, ACC)


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """Correctly rounded, as torch computes it (tl.sqrt on float32 is an approximation)."""
    if ACC == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """Correctly rounded, as torch computes it (float32 "/" may be off by 2 ulp)."""
    if ACC == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def attention_map_fwd_kernel(
    gram_part_ptr,  # [B * HEADS, SPLITS, D, D], ACC
    q_sq_part_ptr, k_sq_part_ptr,  # [B * HEADS, SPLITS, D], ACC
    t_ptr,  # [HEADS]
    map_ptr, gram_ptr,  # [B * HEADS, D, D], ACC
    q_sq_ptr, k_sq_ptr,  # [B * HEADS, D], ACC
    HEADS, D, SPLITS, ROW_TILES,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh, rt = _row_chunk(ROW_TILES)
    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    r_ok = rows < D
    c_ok = cols < D
    mask = r_ok[:, None] & c_ok[None, :]
    tile = rows.to(tl.int64)[:, None] * D + cols[None, :]
    gram = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    q_sq = tl.zeros([BLOCK_R], dtype=ACC)
    k_sq = tl.zeros([BLOCK_D], dtype=ACC)
    # The splits in order: the same sums, bit for bit, on every run.
    for split in range(0, SPLITS):
        part = bh * SPLITS + split
        gram += tl.load(gram_part_ptr + part * D * D + tile, mask=mask, other=0.0)
        q_sq += tl.load(q_sq_part_ptr + part * D + rows, mask=r_ok, other=0.0)
        k_sq += tl.load(k_sq_part_ptr + part * D + cols, mask=c_ok, other=0.0)
    out = bh * D * D + tile
    tl.store(gram_ptr + out, gram, mask=mask)
    tl.store(q_sq_ptr + bh * D + rows, q_sq, mask=r_ok)
    if rt == 0:
        tl.store(k_sq_ptr + bh * D + cols, k_sq, mask=c_ok)
    # max(|x|, eps) as F.normalize divides by.
    eps = _eps(EPS, ACC)
    q_norm = tl.maximum(_sqrt(q_sq, ACC), eps)
    k_norm = tl.maximum(_sqrt(k_sq, ACC), eps)
    t = tl.load(t_ptr + bh % HEADS).to(ACC)
    logits = _div(gram, q_norm[:, None] * k_norm[None, :], ACC) * t
    logits = tl.where(c_ok[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    p = _div(p, tl.sum(p, 1)[:, None], ACC)
    tl.store(map_ptr + out, p, mask=mask)


@triton.jit
def attention_map_bwd_kernel(
    grad_map_ptr, map_ptr, gram_ptr,  # [B * HEADS, D, D], ACC
    q_sq_ptr, k_sq_ptr,  # [B * HEADS, D], ACC
    t_ptr,  # [HEADS]
    grad_gram_ptr,  # [B * HEADS, D, D], ACC
    grad_q_sq_ptr,  # [B * HEADS, D], ACC
    grad_k_sq_ptr,  # [B * HEADS, ROW_TILES, D], ACC: each row tile's share
    grad_t_ptr,  # [B * HEADS, ROW_TILES], ACC: each row tile's share
    HEADS, D, ROW_TILES,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh, rt = _row_chunk(ROW_TILES)
    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    r_ok = rows < D
    c_ok = cols < D
    mask = r_ok[:, None] & c_ok[None, :]
    at = bh * D * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    p = tl.load(map_ptr + at, mask=mask, other=0.0)
    g = tl.load(grad_map_ptr + at, mask=mask, other=0.0)
    gram = tl.load(gram_ptr + at, mask=mask, other=0.0)
    q_len = _sqrt(tl.load(q_sq_ptr + bh * D + rows, mask=r_ok, other=0.0), ACC)
    k_len = _sqrt(tl.load(k_sq_ptr + bh * D + cols, mask=c_ok, other=0.0), ACC)
    eps = _eps(EPS, ACC)
    q_norm = tl.maximum(q_len, eps)
    k_norm = tl.maximum(k_len, eps)
    t = tl.load(t_ptr + bh % HEADS).to(ACC)
    # The softmax's backward: d logits = p * (g - sum_j g p).
    d_logits = p * (g - tl.sum(g * p, 1)[:, None])
    inv = 1.0 / (q_norm[:, None] * k_norm[None, :])
    cosine = gram * inv
    d_cosine_t = tl.where(mask, d_logits * cosine, 0.0)  # logits = t * cosine
    tl.store(grad_gram_ptr + at, d_logits * t * inv, mask=mask)
    tl.store(grad_t_ptr + bh * ROW_TILES + rt, tl.sum(tl.sum(d_cosine_t, 1), 0))
    # cosine_ij = gram_ij / (|q_i| |k_j|): d|q_i| = -t sum_j d_logits_ij cosine_ij / |q_i|, and
    # d q_sq = d|q| / (2 |q|) where |q| >= eps (below it the clamp passes no gradient).
    d_q_norm = -t * tl.sum(d_cosine_t, 1) / q_norm
    d_k_norm = -t * tl.sum(d_cosine_t, 0) / k_norm
    grad_q_sq = tl.where(q_len >= eps, d_q_norm / (2.0 * q_norm), 0.0)
    grad_k_sq = tl.where(k_len >= eps, d_k_norm / (2.0 * k_norm), 0.0)
    tl.store(grad_q_sq_ptr + bh * D + rows, grad_q_sq, mask=r_ok)
    tl.store(grad_k_sq_ptr + (bh * ROW_TILES + rt) * D + cols, grad_k_sq, mask=c_ok)


# --- host launchers ------------------------------------------------------------------------------


def _tiles(d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, row tiles) of maps of side ``d``."""
    block_d = triton.next_power_of_2(max(d, 1))
    block_r = min(block_d, max(1, _TILE // block_d))
    return block_r, block_d, triton.cdiv(d, block_r)


def _check_width(d: int) -> None:
    if d > MAX_D:
        raise ValueError(
            f"channel_attention_map: the Triton kernels take maps up to {MAX_D} rows per head, got "
            f"D = {d}; use backend='reference'"
        )


def channel_attention_map_fwd(
    q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map [B, heads, D, D], gram, q_sq, k_sq [B, heads, D]) in the accumulation dtype."""
    B, heads, D, _ = q.shape
    _check_width(D)
    acc_torch, acc_tl = _acc_dtype(q, k)
    attn_map = _empty((B, heads, D, D), acc_torch, q.device)
    gram = _empty((B, heads, D, D), acc_torch, q.device)
    q_sq = _empty((B, heads, D), acc_torch, q.device)
    k_sq = _empty((B, heads, D), acc_torch, q.device)
    if attn_map.numel() == 0:
        return attn_map, gram, q_sq, k_sq
    partials = gram_partials(q, k)
    # No pixels: no partial sums (zero ones), and the map is softmax(0), as in the reference.
    gram_part, q_sq_part, k_sq_part = (gram, q_sq, k_sq) if partials is None else partials
    splits = 0 if partials is None else gram_part.shape[1]
    block_r, block_d, row_tiles = _tiles(D)
    with _device_guard(q):
        attention_map_fwd_kernel[(B * heads * row_tiles,)](
            gram_part, q_sq_part, k_sq_part, temperature.reshape(heads).contiguous(), attn_map, gram,
            q_sq, k_sq, heads, D, splits, row_tiles, EPS=EPS, BLOCK_R=block_r, BLOCK_D=block_d,
            ACC=acc_tl, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return attn_map, gram, q_sq, k_sq


def channel_attention_map_bwd(
    grad_map: torch.Tensor,
    attn_map: torch.Tensor,
    gram: torch.Tensor,
    q_sq: torch.Tensor,
    k_sq: torch.Tensor,
    temperature: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad q, grad k: [B, heads, D, N] contiguous in q's dtype; grad temperature in its shape
    and dtype)."""
    B, heads, D, _ = q.shape
    acc_torch, acc_tl = _acc_dtype(q, k)
    block_r, block_d, row_tiles = _tiles(D)
    grad_gram = _empty((B, heads, D, D), acc_torch, q.device)
    grad_q_sq = _empty((B, heads, D), acc_torch, q.device)
    grad_k_sq = _empty((B, heads, row_tiles, D), acc_torch, q.device)
    grad_t = _empty((B, heads, row_tiles), acc_torch, q.device)
    with _device_guard(q):
        if grad_gram.numel():
            attention_map_bwd_kernel[(B * heads * row_tiles,)](
                grad_map.to(acc_torch).contiguous(), attn_map, gram, q_sq, k_sq,
                temperature.reshape(heads).contiguous(), grad_gram, grad_q_sq, grad_k_sq, grad_t,
                heads, D, row_tiles, EPS=EPS, BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl,
                num_warps=_NUM_WARPS,
            )  # fmt: skip
        else:
            grad_t.zero_()  # no map: the temperature's gradient is 0
        grad_k_sq = grad_k_sq.sum(2) if row_tiles > 1 else grad_k_sq.view(B, heads, D)
        grad_temperature = grad_t.sum((0, 2)).reshape(temperature.shape).to(temperature.dtype)
    grad_q, grad_k = qk_gram_bwd(grad_gram, grad_q_sq, grad_k_sq, q, k)
    return grad_q, grad_k, grad_temperature


# --- torch.library registration ----------------------------------------------------------------


def _fwd_fake(
    q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, heads, D, _ = q.shape
    acc = _acc_dtype(q, k)[0]
    square, rows = (B, heads, D, D), (B, heads, D)
    return (
        q.new_empty(square, dtype=acc),
        q.new_empty(square, dtype=acc),
        q.new_empty(rows, dtype=acc),
        q.new_empty(rows, dtype=acc),
    )


def _bwd_fake(
    grad_map: torch.Tensor,
    attn_map: torch.Tensor,
    gram: torch.Tensor,
    q_sq: torch.Tensor,
    k_sq: torch.Tensor,
    temperature: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), torch.empty_like(temperature)


_library.define_triton(
    "channel_attention_map",
    channel_attention_map_fwd,
    channel_attention_map_bwd,
    _fwd_fake,
    _bwd_fake,
    _autograd,
)


def channel_attention_map_triton(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``moce_kernels.channel_attention_map`` with the Triton kernels (a GPU, or the
    interpreter); arguments validated by the public function."""
    return torch.ops.moce_triton.channel_attention_map_fwd(q, k, temperature)[0]
