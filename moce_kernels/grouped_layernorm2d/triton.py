"""``grouped_layernorm2d`` in Triton: ``torch.ops.moce_triton.grouped_layernorm2d_fwd`` / ``_bwd``.

``moce_kernels/layernorm2d/triton.py`` row by row, each row over its own expert's channels. x is
[N, C_max, H, W], contiguous: a program owns a tile of BLOCK_P contiguous pixels of one row n and
walks the channels (coalesced row loads, reductions over C across the rows of the tile, no
transposes). It finds its row's expert on the device, ``e = #{experts whose rows end at or
before n}`` over the E + 1 offsets (no host read), then that expert's width ``channels[e]`` from
a small cached int32 device tensor, and normalises over those channels only: loads are masked
past them (whatever lies there, NaN included, is never read) and the stores write exact zeros
there, so a row needs no other pass to clear its padding.

- C_max <= ``_SINGLE_TILE_MAX_C`` (layernorm2d's): the whole [BLOCK_C, BLOCK_P] tile in registers,
  x read once, two-pass mean / variance on the registers.
- Wider: chunks of channels, up to the expert's width for the statistics (Chan's combination of
  the chunks' means and centred sums of squares), then a sweep over C_max writing y and zeros.
Both take the statistics of x minus its channel-0 value (always one of the expert's), so
|mean| >> std loses nothing. Block sizes, warps and paths are layernorm2d's ``_blocks`` for
C_max: fixed by the shape, no autotuning.

Backward: grad x in one sweep per tile (two on the chunked path), exact zeros past the expert's
channels. Grad weight / grad bias are deterministic without atomics, in two stages: a program
owns a chunk of pixel tiles of one row (``LOOP_TILES``: several when the rows have many tiles
and BLOCK_C <= 256, so that the programs still fill a GPU and the partial sums are few enough for
a short second stage; one for wider tiles, whose registers the loop would spill) and writes its
per-channel sums of grad y * xhat and grad y into [N * chunks, C_max] float32 buffers. Then
``grouped_layernorm2d_reduce_kernel``, one program per (expert, block of channels), sums the
expert's rows' chunks ``offsets[e] * chunks .. offsets[e + 1] * chunks`` (bounds loaded on the
device) in a fixed order and writes exact zeros past the expert's channels and for experts
without rows.

Statistics and accumulation in float32 (float64 for float64 input, so gradcheck works); y in x's
dtype; weight and bias may have any float dtype. Non-contiguous inputs are copied to contiguous
NCHW first. ``custom_op`` rather than ``triton_op``: see ``moce_kernels/layernorm2d/triton.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.grouped_layernorm2d import _autograd
from moce_kernels.layernorm2d.triton import _blocks

# Shared with the other Triton bindings (moce_kernels/_triton_common.py).
_acc_dtype = _triton_common.acc_dtype
_device_guard = _triton_common.device_guard
_empty = _triton_common.empty
_expert_of_row = _triton_common.expert_of_row
_row_chunk = _triton_common.row_chunk
_metadata = _triton_common.expert_metadata

#: The backward's programs (rows * chunks) to aim for: a few per SM of an H100, so that the GPU
#: is full, while the partial sums (one [C_max] pair per program) stay few for the reduction.
_BWD_PROGRAMS = 1024
#: Most pixel tiles per backward program (bounds its loop when rows * tiles is large).
_MAX_CHUNK_TILES = 64
#: Widest BLOCK_C whose backward programs loop over several pixel tiles: 8 elements of a tile
#: per thread (layernorm2d's warps), ~126 registers on sm_90 with the loop. Wider tiles hold 16
#: per thread and would spill with the loop: one tile per program there, as in layernorm2d.
_LOOP_TILES_MAX_C = 256
#: The reduction's tile: BLOCK_R partial sums of BLOCK_C channels at a time.
_REDUCE_BLOCK_R = 32
_REDUCE_BLOCK_C = 64


@triton.jit
def grouped_layernorm2d_fwd_kernel(
    x_ptr,  # [N, C_MAX, HW]
    w_ptr,  # [E, C_MAX]
    b_ptr,  # [E, C_MAX]
    off_ptr,  # [E + 1] int32 / int64 row offsets
    meta_ptr,  # [2 * E] int32: channels (twice, see _expert_meta)
    gate_ptr,  # [N, C_MAX, HW] (unused without HAS_GATE)
    y_ptr,  # [N, C_MAX, HW], the gate's dtype with HAS_GATE, else x's
    mean_ptr,  # [N, HW], ACC
    rstd_ptr,  # [N, HW], ACC
    C_MAX,
    HW,
    E,
    TILES,  # pixel tiles per row
    eps,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    ACC: tl.constexpr,
):
    row, pid_p = _row_chunk(TILES)
    pid_p = pid_p.to(tl.int32)
    e, c_e, _ = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
    n_e = c_e.to(ACC)
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    pmask = pix < HW
    # int32 offsets inside a row (its C_MAX * HW elements fit, see _check_layout), int64 row
    # starts: fewer registers than int64 offsets per element.
    x_row = x_ptr + row * C_MAX * HW
    y_row = y_ptr + row * C_MAX * HW
    gate_row = gate_ptr + row * C_MAX * HW
    w_row = w_ptr + e * C_MAX
    b_row = b_ptr + e * C_MAX
    chan = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    # Statistics of x - x[channel 0] (c_e >= 1: always the expert's): exact for |mean| >> std.
    shift = tl.load(x_row + pix, mask=pmask, other=0.0).to(ACC)  # [BLOCK_P]
    if SINGLE_TILE:
        cmask = chan < c_e
        mask = cmask[:, None] & pmask[None, :]
        offs = chan[:, None] * HW + pix[None, :]  # [BLOCK_C, BLOCK_P]
        xs = tl.where(mask, tl.load(x_row + offs, mask=mask, other=0.0).to(ACC) - shift[None, :], 0.0)
        mean_s = tl.sum(xs, 0) / n_e  # [BLOCK_P]
        xc = tl.where(mask, xs - mean_s[None, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / n_e + eps)
        w = tl.load(w_row + chan, mask=cmask, other=0.0).to(ACC)
        b = tl.load(b_row + chan, mask=cmask, other=0.0).to(ACC)
        y = xc * rstd[None, :] * w[:, None] + b[:, None]
        if HAS_GATE:
            y = y * tl.load(gate_row + offs, mask=mask, other=0.0).to(ACC)
        # where(): exact zeros past the expert's channels even where a NaN made rstd NaN.
        y = tl.where(mask, y, 0.0)
        tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=(chan < C_MAX)[:, None] & pmask[None, :])
    else:
        # Chan's combination of per-chunk (count, mean, centred sum of squares) of x - shift,
        # over the expert's channels only.
        count = tl.zeros([BLOCK_P], dtype=ACC)
        mean_s = tl.zeros([BLOCK_P], dtype=ACC)
        m2 = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, c_e, BLOCK_C):
            cmask = (c0 + chan) < c_e
            mask = cmask[:, None] & pmask[None, :]
            offs = (c0 + chan[:, None]) * HW + pix[None, :]
            xs = tl.where(mask, tl.load(x_row + offs, mask=mask, other=0.0).to(ACC) - shift[None, :], 0.0)
            n_chunk = tl.minimum(c_e - c0, BLOCK_C).to(ACC)
            chunk_mean = tl.sum(xs, 0) / n_chunk
            xc = tl.where(mask, xs - chunk_mean[None, :], 0.0)
            chunk_m2 = tl.sum(xc * xc, 0)
            total = count + n_chunk
            delta = chunk_mean - mean_s
            mean_s = mean_s + delta * (n_chunk / total)
            m2 = m2 + chunk_m2 + delta * delta * (count * n_chunk / total)
            count = total
        rstd = 1.0 / tl.sqrt(m2 / n_e + eps)
        # Every channel of the row: the expert's get y, the rest exact zeros.
        for c0 in range(0, C_MAX, BLOCK_C):
            cmask = (c0 + chan) < c_e
            mask = cmask[:, None] & pmask[None, :]
            offs = (c0 + chan[:, None]) * HW + pix[None, :]
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
            w = tl.load(w_row + c0 + chan, mask=cmask, other=0.0).to(ACC)
            b = tl.load(b_row + c0 + chan, mask=cmask, other=0.0).to(ACC)
            y = ((x - shift[None, :]) - mean_s[None, :]) * rstd[None, :] * w[:, None] + b[:, None]
            if HAS_GATE:
                y = y * tl.load(gate_row + offs, mask=mask, other=0.0).to(ACC)
            y = tl.where(mask, y, 0.0)
            out_mask = ((c0 + chan) < C_MAX)[:, None] & pmask[None, :]
            tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=out_mask)
    mean = shift + mean_s
    stat_offs = row * HW + pix
    tl.store(mean_ptr + stat_offs, mean, mask=pmask)
    tl.store(rstd_ptr + stat_offs, rstd, mask=pmask)


@triton.jit
def _gated_grad(
    gy_row, gate_row, gg_row, offs, mask, out_mask, xhat, w, b, HAS_GATE: tl.constexpr, ACC: tl.constexpr
):
    """grad y of the LayerNorm's own output: with HAS_GATE (y = LN(x) * gate), ``grad y * gate``,
    storing grad gate = ``grad y * LN(x)`` (exact zeros past the expert's channels); else grad y."""
    gy = tl.load(gy_row + offs, mask=mask, other=0.0).to(ACC)
    if HAS_GATE:
        gate = tl.load(gate_row + offs, mask=mask, other=0.0).to(ACC)
        grad_gate = tl.where(mask, gy * (xhat * w[:, None] + b[:, None]), 0.0)
        tl.store(gg_row + offs, grad_gate.to(gg_row.dtype.element_ty), mask=out_mask)
        gy = gy * gate
    return gy


@triton.jit
def _bwd_tile(
    gy_row, x_row, gx_row, gate_row, gg_row, mean_row, rstd_row, w, b, chan, cmask, pix, n_e, C_MAX, HW,
    HAS_GATE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Store grad x (and grad gate) of one [BLOCK_C, BLOCK_P] tile of a row (all its channels in
    registers); return the tile's per-channel sums of grad y * xhat and of grad y ([BLOCK_C]
    each; grad y of the LayerNorm's output, i.e. times the gate with HAS_GATE)."""
    pmask = pix < HW
    mask = cmask[:, None] & pmask[None, :]
    offs = chan[:, None] * HW + pix[None, :]
    out_mask = (chan < C_MAX)[:, None] & pmask[None, :]
    mean = tl.load(mean_row + pix, mask=pmask, other=0.0).to(ACC)
    rstd = tl.load(rstd_row + pix, mask=pmask, other=0.0).to(ACC)
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    gy = _gated_grad(gy_row, gate_row, gg_row, offs, mask, out_mask, xhat, w, b, HAS_GATE, ACC)
    wgy = gy * w[:, None]
    mean_wgy_xhat = tl.sum(wgy * xhat, 0) / n_e
    mean_wgy = tl.sum(wgy, 0) / n_e
    gx = (wgy - xhat * mean_wgy_xhat[None, :] - mean_wgy[None, :]) * rstd[None, :]
    gx = tl.where(mask, gx, 0.0)
    tl.store(gx_row + offs, gx.to(gx_row.dtype.element_ty), mask=out_mask)
    return tl.sum(gy * xhat, 1), tl.sum(gy, 1)


@triton.jit
def grouped_layernorm2d_bwd_kernel(
    gy_ptr,  # [N, C_MAX, HW], the forward output's dtype
    x_ptr,  # [N, C_MAX, HW]
    w_ptr,  # [E, C_MAX]
    b_ptr,  # [E, C_MAX] (unused without HAS_GATE)
    gate_ptr,  # [N, C_MAX, HW] (unused without HAS_GATE)
    off_ptr,  # [E + 1]
    meta_ptr,  # [2 * E] int32
    mean_ptr,  # [N, HW], ACC
    rstd_ptr,  # [N, HW], ACC
    gx_ptr,  # [N, C_MAX, HW], x's dtype
    gg_ptr,  # [N, C_MAX, HW], the gate's dtype (unused without HAS_GATE)
    part_w_ptr,  # [N * chunks, C_MAX], ACC: this chunk's sums of gy * xhat per channel
    part_b_ptr,  # [N * chunks, C_MAX], ACC: this chunk's sums of gy per channel
    C_MAX,
    HW,
    E,
    chunk_len,  # pixels per program: a multiple of BLOCK_P (BLOCK_P itself unless LOOP_TILES)
    CHUNKS,  # programs per row
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    LOOP_TILES: tl.constexpr,
    HAS_GATE: tl.constexpr,
    ACC: tl.constexpr,
):
    row, chunk = _row_chunk(CHUNKS)
    part_row = (row * CHUNKS + chunk) * C_MAX
    chunk = chunk.to(tl.int32)
    e, c_e, _ = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
    n_e = c_e.to(ACC)
    # int32 offsets inside a row, int64 row starts (as in the forward).
    row_start = row * C_MAX * HW
    x_row = x_ptr + row_start
    gy_row = gy_ptr + row_start
    gx_row = gx_ptr + row_start
    gate_row = gate_ptr + row_start
    gg_row = gg_ptr + row_start
    mean_row = mean_ptr + row * HW
    rstd_row = rstd_ptr + row * HW
    w_row = w_ptr + e * C_MAX
    b_row = b_ptr + e * C_MAX
    chan = tl.arange(0, BLOCK_C)
    start = chunk * chunk_len
    # grad x = rstd * (w*gy - mean_c(w*gy) - xhat * mean_c(w*gy*xhat)), xhat = (x - mean) * rstd,
    # the means over the expert's c_e channels; grad y past them is never read (the output
    # there is a constant zero).
    if SINGLE_TILE:
        cmask = chan < c_e
        w = tl.load(w_row + chan, mask=cmask, other=0.0).to(ACC)
        b = tl.zeros([BLOCK_C], dtype=ACC)
        if HAS_GATE:
            b = tl.load(b_row + chan, mask=cmask, other=0.0).to(ACC)
        tile = tl.arange(0, BLOCK_P)
        if LOOP_TILES:
            # The chunk's per-channel sums stay in registers across its tiles: one partial per chunk.
            sum_gy_xhat = tl.zeros([BLOCK_C], dtype=ACC)
            sum_gy = tl.zeros([BLOCK_C], dtype=ACC)
            for p0 in range(start, tl.minimum(start + chunk_len, HW), BLOCK_P):
                tile_gy_xhat, tile_gy = _bwd_tile(
                    gy_row, x_row, gx_row, gate_row, gg_row, mean_row, rstd_row, w, b, chan, cmask, p0 + tile,
                    n_e, C_MAX, HW, HAS_GATE, ACC,
                )  # fmt: skip
                sum_gy_xhat += tile_gy_xhat
                sum_gy += tile_gy
        else:
            sum_gy_xhat, sum_gy = _bwd_tile(
                gy_row, x_row, gx_row, gate_row, gg_row, mean_row, rstd_row, w, b, chan, cmask, start + tile,
                n_e, C_MAX, HW, HAS_GATE, ACC,
            )  # fmt: skip
        tl.store(part_w_ptr + part_row + chan, sum_gy_xhat, mask=cmask)
        tl.store(part_b_ptr + part_row + chan, sum_gy, mask=cmask)
    else:
        # One tile per program (the host passes chunk_len = BLOCK_P): per-channel sums cannot
        # stay in registers across tiles when C_max is looped over.
        pix = start + tl.arange(0, BLOCK_P)
        pmask = pix < HW
        mean = tl.load(mean_row + pix, mask=pmask, other=0.0).to(ACC)
        rstd = tl.load(rstd_row + pix, mask=pmask, other=0.0).to(ACC)
        sum_wgy_xhat = tl.zeros([BLOCK_P], dtype=ACC)
        sum_wgy = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, c_e, BLOCK_C):
            cmask = (c0 + chan) < c_e
            mask = cmask[:, None] & pmask[None, :]
            offs = (c0 + chan[:, None]) * HW + pix[None, :]
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
            gy = tl.load(gy_row + offs, mask=mask, other=0.0).to(ACC)
            if HAS_GATE:
                gy = gy * tl.load(gate_row + offs, mask=mask, other=0.0).to(ACC)
            w = tl.load(w_row + c0 + chan, mask=cmask, other=0.0).to(ACC)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
            wgy = gy * w[:, None]
            sum_wgy_xhat += tl.sum(wgy * xhat, 0)
            sum_wgy += tl.sum(wgy, 0)
        mean_wgy_xhat = sum_wgy_xhat / n_e
        mean_wgy = sum_wgy / n_e
        for c0 in range(0, C_MAX, BLOCK_C):
            cmask = (c0 + chan) < c_e
            mask = cmask[:, None] & pmask[None, :]
            offs = (c0 + chan[:, None]) * HW + pix[None, :]
            out_mask = ((c0 + chan) < C_MAX)[:, None] & pmask[None, :]
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
            w = tl.load(w_row + c0 + chan, mask=cmask, other=0.0).to(ACC)
            b = tl.zeros([BLOCK_C], dtype=ACC)
            if HAS_GATE:
                b = tl.load(b_row + c0 + chan, mask=cmask, other=0.0).to(ACC)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
            gy = _gated_grad(gy_row, gate_row, gg_row, offs, mask, out_mask, xhat, w, b, HAS_GATE, ACC)
            wgy = gy * w[:, None]
            gx = (wgy - xhat * mean_wgy_xhat[None, :] - mean_wgy[None, :]) * rstd[None, :]
            gx = tl.where(mask, gx, 0.0)
            tl.store(gx_row + offs, gx.to(gx_ptr.dtype.element_ty), mask=out_mask)
            tl.store(part_w_ptr + part_row + c0 + chan, tl.sum(gy * xhat, 1), mask=cmask)
            tl.store(part_b_ptr + part_row + c0 + chan, tl.sum(gy, 1), mask=cmask)


@triton.jit
def grouped_layernorm2d_reduce_kernel(
    part_w_ptr,  # [N * chunks, C_MAX], ACC
    part_b_ptr,  # [N * chunks, C_MAX], ACC
    off_ptr,  # [E + 1]
    meta_ptr,  # [2 * E] int32
    gw_ptr,  # [E, C_MAX], weight's dtype
    gb_ptr,  # [E, C_MAX], weight's dtype
    C_MAX,
    chunks,
    c_blocks,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    # One program per (expert, block of channels): the expert's rows' chunks in order, BLOCK_R at
    # a time, then one tree over BLOCK_R: the same sequence of additions on every run.
    pid = tl.program_id(0)
    e = pid // c_blocks
    first = (pid % c_blocks) * BLOCK_C
    cols = first + tl.arange(0, BLOCK_C)
    c_e = tl.load(meta_ptr + e)
    cmask = cols < c_e
    lo = tl.load(off_ptr + e).to(tl.int64) * chunks
    hi = tl.load(off_ptr + e + 1).to(tl.int64) * chunks
    # Channels past the expert's width were never written: they sum nothing (exact zeros).
    hi = tl.where(first < c_e, hi, lo)
    parts = tl.arange(0, BLOCK_R)
    acc_w = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for r0 in range(lo, hi, BLOCK_R):
        r = r0 + parts
        mask = (r < hi)[:, None] & cmask[None, :]
        offs = r[:, None] * C_MAX + cols[None, :]
        acc_w += tl.load(part_w_ptr + offs, mask=mask, other=0.0)
        acc_b += tl.load(part_b_ptr + offs, mask=mask, other=0.0)
    out = e * C_MAX + cols
    out_mask = cols < C_MAX
    tl.store(gw_ptr + out, tl.sum(acc_w, 0).to(gw_ptr.dtype.element_ty), mask=out_mask)
    tl.store(gb_ptr + out, tl.sum(acc_b, 0).to(gb_ptr.dtype.element_ty), mask=out_mask)


# --- host launchers ------------------------------------------------------------------------------


def _expert_meta(channels: list[int], device: torch.device) -> torch.Tensor:
    """[2 * E] int32 on ``device``: grouped_pointwise's cached metadata with the channels as both
    widths (``_expert_of_row`` returns the first; no host-to-device copy after the first call of
    a configuration: run one before capturing a CUDA graph)."""
    return _metadata(tuple(channels), tuple(channels), device)


def _chunk_len(rows: int, pixels: int, block_c: int, block_p: int, single: bool) -> int:
    """Pixels per backward program: about ``_BWD_PROGRAMS`` programs over all rows, each a whole
    number of tiles (at most ``_MAX_CHUNK_TILES``). One tile on the chunked-C path and for
    BLOCK_C > ``_LOOP_TILES_MAX_C``. Fixed by the shape, so the partial sums, and the bits of the
    gradients, are the same on every run."""
    if not single or block_c > _LOOP_TILES_MAX_C:
        return block_p
    tiles = triton.cdiv(pixels, block_p)
    return block_p * max(1, min(_MAX_CHUNK_TILES, rows * tiles // _BWD_PROGRAMS))


def _check_layout(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, channels, gate: torch.Tensor | None = None
) -> None:
    """The ops can be called directly (``torch.ops.moce_triton``): refuse what would read out of
    bounds (the public function checks everything, with clearer messages)."""
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if x.dim() != 4 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"x must be [N, C_max, H, W] and weight [E, C_max], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    num_experts = weight.shape[0]
    if offsets.shape != (num_experts + 1,) or len(channels) != num_experts:
        raise ValueError(
            f"offsets must be [E + 1] and channels E long for E = {num_experts}, got "
            f"{tuple(offsets.shape)} and {len(channels)}"
        )
    if any(not 1 <= c <= x.shape[1] for c in channels):
        raise ValueError(f"each of channels must be in 1..C_max = {x.shape[1]}, got {list(channels)}")
    if math.prod(x.shape[1:]) >= 2**31:
        # The kernels index inside a row with int32 (fewer registers than int64).
        raise ValueError(f"a row of x must have fewer than 2**31 elements, got {tuple(x.shape[1:])}")


def grouped_layernorm2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    offsets: torch.Tensor,
    channels: list[int],
    eps: float,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [N, C_max, H, W] (``LN(x) * gate`` in the gate's dtype with a gate, else ``LN(x)`` in x's
    dtype), mean and rstd [N, H, W] in float32 (float64 for float64 x)."""
    _check_layout(x, weight, offsets, channels, gate)
    x, weight, bias, offsets = (t.contiguous() for t in (x, weight, bias, offsets))
    gate = None if gate is None else gate.contiguous()
    rows, c_max, height, width = x.shape
    acc_torch, acc_tl = _acc_dtype(x)
    y = _empty(x.shape, x.dtype if gate is None else gate.dtype, x.device)
    mean = _empty((rows, height, width), acc_torch, x.device)
    rstd = _empty((rows, height, width), acc_torch, x.device)
    if x.numel() == 0:
        return y, mean, rstd
    pixels = height * width
    block_c, block_p, single, num_warps = _blocks(c_max, pixels)
    num_experts = weight.shape[0]
    tiles = triton.cdiv(pixels, block_p)
    with _device_guard(x):
        grouped_layernorm2d_fwd_kernel[(rows * tiles,)](
            x, weight, bias, offsets, _expert_meta(channels, x.device), x if gate is None else gate, y,
            mean, rstd, c_max, pixels, num_experts, tiles, float(eps),
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_C=block_c, BLOCK_P=block_p,
            SINGLE_TILE=single, HAS_GATE=gate is not None, ACC=acc_tl, num_warps=num_warps,
        )  # fmt: skip
    return y, mean, rstd


def grouped_layernorm2d_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    channels: list[int],
    gate: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x [N, C_max, H, W] in x's dtype, grad weight, grad bias [E, C_max] in weight's dtype,
    grad gate [N, C_max, H, W] in the gate's dtype, or an empty tensor without a gate).

    With a gate (the forward's ``LN(x) * gate``) the bias is needed too (grad gate = grad y *
    LN(x)). The parameter gradients are zero past each expert's channels and for experts without
    rows, and the same bits on every run.
    """
    _check_layout(x, weight, offsets, channels, gate)
    if gate is not None and bias is None:
        raise ValueError("grouped_layernorm2d_bwd: a gate needs the bias (grad gate = grad y * LN(x))")
    grad_y, x, weight, offsets, mean, rstd = (
        t.contiguous() for t in (grad_y, x, weight, offsets, mean, rstd)
    )
    gate = None if gate is None else gate.contiguous()
    bias = weight if gate is None else bias.contiguous()  # read only with a gate
    rows, c_max, height, width = x.shape
    num_experts = weight.shape[0]
    acc_torch, acc_tl = _acc_dtype(x)
    grad_x = _empty(x.shape, x.dtype, x.device)
    grad_weight = _empty(weight.shape, weight.dtype, weight.device)
    grad_bias = _empty(weight.shape, weight.dtype, weight.device)
    grad_gate = _empty(
        (0,) if gate is None else gate.shape, x.dtype if gate is None else gate.dtype, x.device
    )
    if x.numel() == 0:
        # No pixels: nothing flows back to the parameters.
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_x, grad_weight, grad_bias, grad_gate
    pixels = height * width
    block_c, block_p, single, num_warps = _blocks(c_max, pixels)
    chunk_len = _chunk_len(rows, pixels, block_c, block_p, single)
    chunks = triton.cdiv(pixels, chunk_len)
    meta = _expert_meta(channels, x.device)
    # Only each row's expert's channels are written, and only those are read.
    part_w = _empty((rows * chunks, c_max), acc_torch, x.device)
    part_b = _empty((rows * chunks, c_max), acc_torch, x.device)
    reduce_c = min(_REDUCE_BLOCK_C, triton.next_power_of_2(c_max))
    c_blocks = triton.cdiv(c_max, reduce_c)
    with _device_guard(x):
        grouped_layernorm2d_bwd_kernel[(rows * chunks,)](
            grad_y, x, weight, bias, x if gate is None else gate, offsets, meta, mean, rstd, grad_x,
            grad_x if gate is None else grad_gate, part_w, part_b, c_max, pixels, num_experts, chunk_len,
            chunks,
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_C=block_c, BLOCK_P=block_p,
            SINGLE_TILE=single, LOOP_TILES=chunk_len > block_p, HAS_GATE=gate is not None, ACC=acc_tl,
            num_warps=num_warps,
        )  # fmt: skip
        grouped_layernorm2d_reduce_kernel[(num_experts * c_blocks,)](
            part_w, part_b, offsets, meta, grad_weight, grad_bias, c_max, chunks, c_blocks,
            BLOCK_R=_REDUCE_BLOCK_R, BLOCK_C=reduce_c, ACC=acc_tl, num_warps=4,
        )  # fmt: skip
    return grad_x, grad_weight, grad_bias, grad_gate


# --- torch.library registration ----------------------------------------------------------------


def _grouped_layernorm2d_fwd_fake(x, weight, bias, offsets, channels, eps, gate=None):
    torch._check(x.dim() == 4, lambda: f"x must be [N, C_max, H, W], got shape {tuple(x.shape)}")
    rows, _, height, width = x.shape
    acc = _acc_dtype(x)[0]
    stats = (rows, height, width)
    y = x.new_empty(x.shape, dtype=x.dtype if gate is None else gate.dtype)
    return y, x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)


def _grouped_layernorm2d_bwd_fake(grad_y, x, weight, offsets, mean, rstd, channels, gate=None, bias=None):
    grad_gate = x.new_empty((0,)) if gate is None else gate.new_empty(gate.shape)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape), grad_gate


_library.define_triton(
    "grouped_layernorm2d",
    grouped_layernorm2d_fwd,
    grouped_layernorm2d_bwd,
    _grouped_layernorm2d_fwd_fake,
    _grouped_layernorm2d_bwd_fake,
    _autograd,
)


def grouped_layernorm2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    offsets: torch.Tensor,
    channels: list[int],
    eps: float,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every expert's LayerNorm2d over its own channels in one Triton launch (GPU, or the
    interpreter), times ``gate`` when given.

    Arguments as ``moce_kernels.grouped_layernorm2d`` (which validates them first): x
    [N, C_max, H, W], weight and bias [E, C_max] (any float dtype), offsets [E + 1] on x's device
    (never read on the host), channels a list of E ints, gate None or x's shape. Non-contiguous
    inputs are copied to contiguous first. Returns [N, C_max, H, W] contiguous in x's dtype (the
    gate's with a gate), exact zeros past each expert's channels; differentiable in x, weight,
    bias and gate (grad weight / grad bias deterministic, in their own dtypes).
    """
    y, _mean, _rstd = torch.ops.moce_triton.grouped_layernorm2d_fwd(
        x.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        offsets.contiguous(),
        list(channels),
        float(eps),
        None if gate is None else gate.contiguous(),
    )
    return y
