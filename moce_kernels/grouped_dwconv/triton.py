"""``grouped_dwconv`` in Triton: ``torch.ops.moce_triton.grouped_dwconv_fwd`` / ``_bwd``.

A depthwise convolution is independent per (row, channel) plane, so the experts' convolutions are
one list of planes: a program owns one BLOCK_H x BLOCK_W tile of BLOCK_C consecutive channels of
one row n (small planes get small tiles and more channels, so that a program always has work).
It finds its row's expert on the device, ``e = #{experts whose rows end at or before n}`` over the
E + 1 offsets (no host read), then that expert's width and kernel size from a small int32 device
tensor. Channels past ``channels[e]`` write exact zeros (a block wholly past them skips the taps).
The halo of the tile is read with masked, shifted loads (zero padding); the shifted tiles overlap,
so after the first tap they come from L1/L2.

Kernel sizes: each of 3, 5, 7, 9 that occurs in the call gets its own fully unrolled branch
(``KERNEL_SET``, a compile-time bit set), and a program runs the branch of its expert's size.
Looping to K_max with masks would issue K_max^2 taps for every expert (81 for a 3x3 next to a
9x9: 9x the instructions), and a runtime-bounded loop cannot be unrolled; the branches cost only
compile time, and a call with one kernel size (the trunk's 3x3 or 7x7) compiles one branch.

Backward: grad x is the same convolution of grad y with the flipped kernel (``FLIP``; channels
past ``channels[e]`` get 0, the output there does not depend on x). Grad weight / grad bias are
deterministic without atomics: ``grouped_dwconv_bwd_weight_kernel`` writes each tile's K_e^2 tap
sums and its sum of grad y into a float32 buffer, and ``grouped_dwconv_bwd_reduce_kernel`` sums
them per (expert, channel) over the expert's rows and tiles in a fixed order, writing exact zeros
outside the expert's K_e x K_e window and channels (and for experts without rows).

Inputs and outputs in float32 / bfloat16 / float16 (float64 too, for gradcheck) with float32
(float64) accumulation. Non-contiguous inputs are copied to contiguous NCHW first.
``custom_op`` rather than ``triton_op``: see ``moce_kernels/layernorm2d/triton.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.grouped_dwconv import _autograd

# Shared with the other Triton bindings (moce_kernels/_triton_common.py).
_acc_dtype = _triton_common.acc_dtype
_device_guard = _triton_common.device_guard
_empty = _triton_common.empty
_metadata = _triton_common.expert_metadata
_expert_of_row = _triton_common.expert_of_row

#: The kernel sizes the kernels specialise for; bit i of KERNEL_SET stands for size 3 + 2 * i.
KERNEL_SIZES = (3, 5, 7, 9)
#: Largest spatial tile: 16 rows of 64 contiguous pixels (256 bytes per row in float32).
_BLOCK_H = 16
_BLOCK_W = 64
#: Elements per program (BLOCK_C * BLOCK_H * BLOCK_W): small planes take more channels.
_TILE_ELEMENTS = 2048
#: The same under the Triton interpreter (CPU tests), which pays per program and per operation
#: rather than per element, and has no registers to run out of.
_INTERPRETER_TILE_ELEMENTS = 16384
#: Tiles of a plane summed at once by the weight-gradient reduction.
_REDUCE_BLOCK_TILES = 16
#: 8 accumulators per thread: ptxas gives ~90 registers and no spills on sm_90 (7x7, bf16), where
#: 4 warps take ~150 (the unrolled taps keep many loads in flight).
_CONV_WARPS = 8


@triton.jit
def _conv_taps(
    acc, planes, w_base, chan_ok, hs, ws, H, W, KS: tl.constexpr, K_MAX: tl.constexpr, FLIP: tl.constexpr
):
    """acc [BLOCK_C, BLOCK_H, BLOCK_W] += the KS x KS correlation of each channel's plane with its
    centred kernel. ``planes`` / ``w_base``: [BLOCK_C] pointers to the channels' planes / windows."""
    PAD: tl.constexpr = (K_MAX - KS) // 2
    R: tl.constexpr = KS // 2
    for i in tl.static_range(KS):
        ih = hs + (i - R)
        row_ok = chan_ok[:, None] & ((ih >= 0) & (ih < H))[None, :]  # [BLOCK_C, BLOCK_H]
        row_ptrs = planes[:, None] + (ih * W)[None, :]
        for j in tl.static_range(KS):
            iw = ws + (j - R)
            # The halo: zero padding outside the plane.
            mask = row_ok[:, :, None] & ((iw >= 0) & (iw < W))[None, None, :]
            xv = tl.load(row_ptrs[:, :, None] + iw[None, None, :], mask=mask, other=0.0)
            # grad x = grad y correlated with the flipped kernel.
            if FLIP:
                wv = tl.load(
                    w_base + (KS - 1 - i + PAD) * K_MAX + (KS - 1 - j + PAD), mask=chan_ok, other=0.0
                )
            else:
                wv = tl.load(w_base + (i + PAD) * K_MAX + (j + PAD), mask=chan_ok, other=0.0)
            acc += xv.to(acc.dtype) * wv.to(acc.dtype)[:, None, None]
    return acc


@triton.jit
def _weight_taps(gy, planes, part_ptrs, chan_ok, hs, ws, H, W, KS: tl.constexpr, K_MAX: tl.constexpr):
    """part[c, i, j] = sum over the tile of gy[c, h, w] * x[c, h + i - R, w + j - R] for the KS x KS
    taps; ``part_ptrs``: [BLOCK_C] pointers to each channel's K_MAX x K_MAX partial sums."""
    PAD: tl.constexpr = (K_MAX - KS) // 2
    R: tl.constexpr = KS // 2
    for i in tl.static_range(KS):
        ih = hs + (i - R)
        row_ok = chan_ok[:, None] & ((ih >= 0) & (ih < H))[None, :]
        row_ptrs = planes[:, None] + (ih * W)[None, :]
        for j in tl.static_range(KS):
            iw = ws + (j - R)
            mask = row_ok[:, :, None] & ((iw >= 0) & (iw < W))[None, None, :]
            xv = tl.load(row_ptrs[:, :, None] + iw[None, None, :], mask=mask, other=0.0)
            tap = tl.sum(tl.sum(gy * xv.to(gy.dtype), 2), 1)  # [BLOCK_C]
            tl.store(part_ptrs + (i + PAD) * K_MAX + (j + PAD), tap, mask=chan_ok)


@triton.jit
def grouped_dwconv_fwd_kernel(
    x_ptr,  # [N, C_MAX, H, W]
    w_ptr,  # [E, C_MAX, K_MAX, K_MAX]
    b_ptr,  # [E, C_MAX] (unused without HAS_BIAS)
    off_ptr,  # [E + 1] int32 / int64 row offsets
    meta_ptr,  # [2 * E] int32: channels, then kernel sizes
    y_ptr,  # [N, C_MAX, H, W]
    C_MAX,
    H,
    W,
    E,
    c_blocks,
    tiles_w,
    tiles,
    K_MAX: tl.constexpr,
    KERNEL_SET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FLIP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ACC: tl.constexpr,
):
    # Program = (row, block of BLOCK_C channels, spatial tile), the tile fastest.
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    c_block = (pid // tiles) % c_blocks
    row = pid // (tiles * c_blocks)
    e, c_e, k_e = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
    chans = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    # Channels past the expert's width keep acc = 0 (no bias either).
    chan_ok = chans < c_e
    planes = x_ptr + (row * C_MAX + chans) * H * W  # [BLOCK_C]
    hs = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    ws = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W]
    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=ACC)
    if c_block * BLOCK_C < c_e:
        w_base = w_ptr + (e * C_MAX + chans) * (K_MAX * K_MAX)
        # One unrolled branch per kernel size present in the call (see the module docstring).
        if KERNEL_SET & 1:
            if k_e == 3:
                acc = _conv_taps(acc, planes, w_base, chan_ok, hs, ws, H, W, 3, K_MAX, FLIP)
        if KERNEL_SET & 2:
            if k_e == 5:
                acc = _conv_taps(acc, planes, w_base, chan_ok, hs, ws, H, W, 5, K_MAX, FLIP)
        if KERNEL_SET & 4:
            if k_e == 7:
                acc = _conv_taps(acc, planes, w_base, chan_ok, hs, ws, H, W, 7, K_MAX, FLIP)
        if KERNEL_SET & 8:
            if k_e == 9:
                acc = _conv_taps(acc, planes, w_base, chan_ok, hs, ws, H, W, 9, K_MAX, FLIP)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * C_MAX + chans, mask=chan_ok, other=0.0).to(ACC)[:, None, None]
    out_ok = ((chans < C_MAX)[:, None] & (hs < H)[None, :])[:, :, None] & (ws < W)[None, None, :]
    out_rows = ((row * C_MAX + chans) * H * W)[:, None] + (hs * W)[None, :]  # [BLOCK_C, BLOCK_H]
    tl.store(y_ptr + out_rows[:, :, None] + ws[None, None, :], acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def grouped_dwconv_bwd_weight_kernel(
    x_ptr,  # [N, C_MAX, H, W]
    gy_ptr,  # [N, C_MAX, H, W]
    off_ptr,  # [E + 1]
    meta_ptr,  # [2 * E] int32
    part_w_ptr,  # [N * C_MAX, tiles, K_MAX * K_MAX] ACC: per-tile tap sums
    part_b_ptr,  # [N * C_MAX, tiles] ACC: per-tile sums of grad y
    C_MAX,
    H,
    W,
    E,
    c_blocks,
    tiles_w,
    tiles,
    K_MAX: tl.constexpr,
    KERNEL_SET: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    c_block = (pid // tiles) % c_blocks
    row = pid // (tiles * c_blocks)
    e, c_e, k_e = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
    chans = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < c_e
    # Channels past the expert's width write nothing: the reduction never reads them.
    if c_block * BLOCK_C < c_e:
        hs = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        ws = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        plane_offs = (row * C_MAX + chans) * H * W  # [BLOCK_C]
        mask = (chan_ok[:, None] & (hs < H)[None, :])[:, :, None] & (ws < W)[None, None, :]
        rows = plane_offs[:, None] + (hs * W)[None, :]
        gy = tl.load(gy_ptr + rows[:, :, None] + ws[None, None, :], mask=mask, other=0.0).to(ACC)
        part = (row * C_MAX + chans) * tiles + tile  # [BLOCK_C] rows of the partial-sum buffers
        tl.store(part_b_ptr + part, tl.sum(tl.sum(gy, 2), 1), mask=chan_ok)
        planes = x_ptr + plane_offs
        part_ptrs = part_w_ptr + part * (K_MAX * K_MAX)
        if KERNEL_SET & 1:
            if k_e == 3:
                _weight_taps(gy, planes, part_ptrs, chan_ok, hs, ws, H, W, 3, K_MAX)
        if KERNEL_SET & 2:
            if k_e == 5:
                _weight_taps(gy, planes, part_ptrs, chan_ok, hs, ws, H, W, 5, K_MAX)
        if KERNEL_SET & 4:
            if k_e == 7:
                _weight_taps(gy, planes, part_ptrs, chan_ok, hs, ws, H, W, 7, K_MAX)
        if KERNEL_SET & 8:
            if k_e == 9:
                _weight_taps(gy, planes, part_ptrs, chan_ok, hs, ws, H, W, 9, K_MAX)


@triton.jit
def grouped_dwconv_bwd_reduce_kernel(
    part_w_ptr,  # [N * C_MAX, tiles, K_MAX * K_MAX] ACC
    part_b_ptr,  # [N * C_MAX, tiles] ACC
    off_ptr,  # [E + 1]
    meta_ptr,  # [2 * E] int32
    gw_ptr,  # [E, C_MAX, K_MAX, K_MAX]
    gb_ptr,  # [E, C_MAX]
    C_MAX,
    E,
    c_blocks,
    tiles,
    K_MAX: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ACC: tl.constexpr,
):
    # One program per (expert, block of channels): the expert's rows in order, BLOCK_TILES tiles
    # at a time, then one tree over the tiles: the same sequence on every run.
    pid = tl.program_id(0).to(tl.int64)
    e = pid // c_blocks
    first_chan = (pid % c_blocks) * BLOCK_C
    chans = first_chan + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    lo = tl.load(off_ptr + e).to(tl.int64)
    hi = tl.load(off_ptr + e + 1).to(tl.int64)
    c_e = tl.load(meta_ptr + e)
    k_e = tl.load(meta_ptr + E + e)
    chan_ok = chans < c_e
    # Channels past the expert's width were never written: they sum nothing (exact zeros).
    hi = tl.where(first_chan < c_e, hi, lo)
    taps = tl.arange(0, BLOCK_T)  # [BLOCK_T], i * K_MAX + j
    ti = taps // K_MAX
    tj = taps % K_MAX
    pad = (K_MAX - k_e) // 2
    in_window = (taps < K_MAX * K_MAX) & (ti >= pad) & (ti < pad + k_e) & (tj >= pad) & (tj < pad + k_e)
    tile_ids = tl.arange(0, BLOCK_TILES)
    acc_w = tl.zeros([BLOCK_C, BLOCK_TILES, BLOCK_T], dtype=ACC)
    acc_b = tl.zeros([BLOCK_C, BLOCK_TILES], dtype=ACC)
    for n in range(lo, hi):
        first = (n * C_MAX + chans) * tiles  # [BLOCK_C]
        for t0 in range(0, tiles, BLOCK_TILES):
            t = t0 + tile_ids
            ok = chan_ok[:, None] & (t < tiles)[None, :]  # [BLOCK_C, BLOCK_TILES]
            parts = first[:, None] + t[None, :]
            acc_b += tl.load(part_b_ptr + parts, mask=ok, other=0.0)
            w_ptrs = part_w_ptr + parts[:, :, None] * (K_MAX * K_MAX) + taps[None, None, :]
            acc_w += tl.load(w_ptrs, mask=ok[:, :, None] & in_window[None, None, :], other=0.0)
    out = (e * C_MAX + chans)[:, None] * (K_MAX * K_MAX) + taps[None, :]
    out_ok = (chans < C_MAX)[:, None] & (taps < K_MAX * K_MAX)[None, :]
    tl.store(gw_ptr + out, tl.sum(acc_w, 1).to(gw_ptr.dtype.element_ty), mask=out_ok)
    tl.store(gb_ptr + e * C_MAX + chans, tl.sum(acc_b, 1).to(gb_ptr.dtype.element_ty), mask=chans < C_MAX)


# --- host launchers ------------------------------------------------------------------------------


def _kernel_set(kernel_sizes: list[int]) -> int:
    bits = 0
    for k in kernel_sizes:
        if k not in KERNEL_SIZES:
            raise ValueError(f"grouped_dwconv (Triton): kernel sizes must be in {KERNEL_SIZES}, got {k}")
        bits |= 1 << ((k - 3) // 2)
    return bits


def _tile_budget() -> int:
    return _INTERPRETER_TILE_ELEMENTS if os.environ.get("TRITON_INTERPRET") == "1" else _TILE_ELEMENTS


def _blocks(C_max: int, H: int, W: int) -> dict[str, int]:
    """Block sizes and grid of a call: small planes get small tiles and more channels per program.

    Fixed by the shape (no autotuning), so the weight gradient's partial sums, and with them its
    bits, are the same on every run.
    """
    block_w = min(_BLOCK_W, triton.next_power_of_2(max(W, 1)))
    block_h = min(max(1, (_BLOCK_H * _BLOCK_W) // block_w), triton.next_power_of_2(max(H, 1)))
    block_c = min(triton.next_power_of_2(C_max), max(1, _tile_budget() // (block_h * block_w)))
    tiles_w = triton.cdiv(W, block_w)
    return dict(
        block_c=block_c,
        block_h=block_h,
        block_w=block_w,
        c_blocks=triton.cdiv(C_max, block_c),
        tiles_w=tiles_w,
        tiles=triton.cdiv(H, block_h) * tiles_w,
    )


def _check_layout(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, channels, kernel_sizes):
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x and weight must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    num_experts = weight.shape[0]
    if (
        offsets.shape != (num_experts + 1,)
        or len(channels) != num_experts
        or len(kernel_sizes) != num_experts
    ):
        raise ValueError(
            f"offsets must be [E + 1] and channels / kernel_sizes E long for E = {num_experts}, got "
            f"{tuple(offsets.shape)}, {len(channels)}, {len(kernel_sizes)}"
        )
    if weight.shape[1] != x.shape[1] or weight.shape[2] != weight.shape[3] or weight.shape[3] % 2 == 0:
        raise ValueError(f"weight must be [E, C_max, K_max, K_max], K_max odd; got {tuple(weight.shape)}")
    if any(k > weight.shape[-1] for k in kernel_sizes) or any(not 1 <= c <= x.shape[1] for c in channels):
        raise ValueError("each kernel size must be <= K_max and each width in 1..C_max")


def grouped_dwconv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    channels: list[int],
    kernel_sizes: list[int],
) -> torch.Tensor:
    """y [N, C_max, H, W] in x's dtype (see ``moce_kernels.grouped_dwconv``)."""
    _check_layout(x, weight, offsets, channels, kernel_sizes)
    x, weight, offsets = x.contiguous(), weight.contiguous(), offsets.contiguous()
    N, C_max, H, W = x.shape
    y = _empty(x.shape, x.dtype, x.device)
    if y.numel() == 0:
        return y
    kernel_set = _kernel_set(kernel_sizes)
    meta = _metadata(tuple(channels), tuple(kernel_sizes), x.device)
    b = _blocks(C_max, H, W)
    num_experts = weight.shape[0]
    with _device_guard(x):
        grouped_dwconv_fwd_kernel[(N * b["c_blocks"] * b["tiles"],)](
            x, weight, x if bias is None else bias.contiguous(), offsets, meta, y,
            C_max, H, W, num_experts, b["c_blocks"], b["tiles_w"], b["tiles"],
            K_MAX=weight.shape[-1], KERNEL_SET=kernel_set, HAS_BIAS=bias is not None, FLIP=False,
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_C=b["block_c"], BLOCK_H=b["block_h"],
            BLOCK_W=b["block_w"], ACC=_acc_dtype(x)[1], num_warps=_CONV_WARPS,
        )  # fmt: skip
    return y


def grouped_dwconv_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    channels: list[int],
    kernel_sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x [N, C_max, H, W], grad weight [E, C_max, K_max, K_max], grad bias [E, C_max]).

    Grad weight and grad bias in weight's dtype, zero outside each expert's window and channels
    and for experts without rows; the same bits on every run.
    """
    _check_layout(x, weight, offsets, channels, kernel_sizes)
    grad_y, x, weight, offsets = (t.contiguous() for t in (grad_y, x, weight, offsets))
    N, C_max, H, W = x.shape
    num_experts, k_max = weight.shape[0], weight.shape[-1]
    acc_torch, acc_tl = _acc_dtype(x)
    grad_x = _empty(x.shape, x.dtype, x.device)
    grad_weight = _empty(weight.shape, weight.dtype, weight.device)
    grad_bias = _empty((num_experts, C_max), weight.dtype, weight.device)
    if x.numel() == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_x, grad_weight, grad_bias
    kernel_set = _kernel_set(kernel_sizes)
    meta = _metadata(tuple(channels), tuple(kernel_sizes), x.device)
    b = _blocks(C_max, H, W)
    block_e = triton.next_power_of_2(num_experts)
    grid = (N * b["c_blocks"] * b["tiles"],)
    blocks = dict(BLOCK_E=block_e, BLOCK_C=b["block_c"], BLOCK_H=b["block_h"], BLOCK_W=b["block_w"])
    with _device_guard(x):
        grouped_dwconv_fwd_kernel[grid](
            grad_y, weight, grad_y, offsets, meta, grad_x,
            C_max, H, W, num_experts, b["c_blocks"], b["tiles_w"], b["tiles"],
            K_MAX=k_max, KERNEL_SET=kernel_set, HAS_BIAS=False, FLIP=True, **blocks, ACC=acc_tl,
            num_warps=_CONV_WARPS,
        )  # fmt: skip
        # Only the (plane, tile, tap) entries the reduction reads are written: no need to clear.
        part_w = _empty((N * C_max, b["tiles"], k_max * k_max), acc_torch, x.device)
        part_b = _empty((N * C_max, b["tiles"]), acc_torch, x.device)
        grouped_dwconv_bwd_weight_kernel[grid](
            x, grad_y, offsets, meta, part_w, part_b,
            C_max, H, W, num_experts, b["c_blocks"], b["tiles_w"], b["tiles"],
            K_MAX=k_max, KERNEL_SET=kernel_set, **blocks, ACC=acc_tl, num_warps=_CONV_WARPS,
        )  # fmt: skip
        block_t = triton.next_power_of_2(k_max * k_max)
        block_tiles = min(_REDUCE_BLOCK_TILES, triton.next_power_of_2(b["tiles"]))
        # One channel per program on a GPU at K_max = 9 (E * C_max programs), more for small kernels.
        reduce_c = min(triton.next_power_of_2(C_max), max(1, _tile_budget() // (block_tiles * block_t)))
        reduce_blocks = triton.cdiv(C_max, reduce_c)
        grouped_dwconv_bwd_reduce_kernel[(num_experts * reduce_blocks,)](
            part_w, part_b, offsets, meta, grad_weight, grad_bias, C_max, num_experts, reduce_blocks,
            b["tiles"], K_MAX=k_max, BLOCK_C=reduce_c, BLOCK_TILES=block_tiles, BLOCK_T=block_t, ACC=acc_tl,
            num_warps=4,
        )  # fmt: skip
    return grad_x, grad_weight, grad_bias


# --- torch.library registration ----------------------------------------------------------------


def _grouped_dwconv_fwd_fake(x, weight, bias, offsets, channels, kernel_sizes):
    return x.new_empty(x.shape)


def _grouped_dwconv_bwd_fake(grad_y, x, weight, offsets, channels, kernel_sizes):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        weight.new_empty((weight.shape[0], x.shape[1])),
    )


_library.define_triton(
    "grouped_dwconv",
    grouped_dwconv_fwd,
    grouped_dwconv_bwd,
    _grouped_dwconv_fwd_fake,
    _grouped_dwconv_bwd_fake,
    _autograd,
)


def grouped_dwconv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    channels: list[int],
    kernel_sizes: list[int],
) -> torch.Tensor:
    """Every expert's depthwise convolution in one Triton launch (GPU, or the interpreter).

    Arguments as ``moce_kernels.grouped_dwconv`` (which validates them first): x [N, C_max, H, W],
    weight [E, C_max, K_max, K_max], bias [E, C_max] or None, offsets [E + 1] on x's device (never
    read on the host), channels and kernel_sizes lists of E ints (sizes in 3, 5, 7, 9).
    Non-contiguous x / weight are copied to contiguous first. Returns [N, C_max, H, W] contiguous
    in x's dtype, exact zeros past each expert's channels; differentiable in x, weight and bias.
    """
    return torch.ops.moce_triton.grouped_dwconv_fwd(
        x.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        offsets.contiguous(),
        list(channels),
        list(kernel_sizes),
    )


def depthwise_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=K // 2, groups=C)`` on the grouped kernel (one expert).

    Args:
        x: [N, C, H, W] float; copied to contiguous NCHW when it is not.
        weight: [C, 1, K, K] in x's dtype, K in 3, 5, 7, 9 (the trunk's 3x3 and 7x7 convolutions).
        bias: [C] in x's dtype, or None.

    Returns:
        [N, C, H, W] in x's dtype; differentiable in x, weight and bias.

    Raises:
        ValueError / TypeError: wrong rank, shape, kernel size or dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[:2] != (channels, 1) or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be [C, 1, K, K] with C = {channels}, got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k not in KERNEL_SIZES:
        raise ValueError(f"kernel size must be one of {KERNEL_SIZES}, got {k}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must have shape ({channels},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(
                f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got {t.dtype}, {t.device}"
            )
    # offsets [0, N] made on the device: no host-to-device copy (and no sync) per call.
    offsets = torch.arange(2, dtype=torch.int64, device=x.device) * x.shape[0]
    return grouped_dwconv_triton(
        x,
        weight.reshape(1, channels, k, k),
        None if bias is None else bias.reshape(1, channels),
        offsets,
        [channels],
        [k],
    )
