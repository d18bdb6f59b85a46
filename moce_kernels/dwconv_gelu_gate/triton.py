"""``dwconv_gelu_gate`` in Triton: ``torch.ops.moce_triton.dwconv_gelu_gate_fwd`` / ``_bwd``.

x is [B, 2 * Ch, H, W]; the GDFN gates channel c with channel c + Ch. A program owns one
BLOCK_H x BLOCK_W tile of BLOCK_C consecutive gate channels c of one image: it convolves the
tile of channel c (``a``) and of channel c + Ch (``b``) with float32 accumulation (float64 for
float64), then writes ``gelu(a) * b`` (exact erf GELU). The 2 * Ch-channel convolution output
never goes to memory. The tiling is ``grouped_dwconv``'s (``moce_kernels/grouped_dwconv/triton.py``)
with half its channels per program, since a program holds two accumulators.

The taps are this module's own (``_pair_taps``), not grouped_dwconv's ``_conv_taps``, which
unrolls all K^2 taps of one plane: run for a and then b, ptxas (sm_90) took 211 registers per
thread at 3x3 with grouped_dwconv's tile and 104 with half of it, and spilled at 7x7 even then.
Here a runtime loop runs over the K kernel rows (K unrolled taps each, both halves per tap), on
half the tile: 78 registers at 3x3 and 156 at 9x9, no spills, and seconds rather than ~100 s of
compile time for the 7x7 backward.

Backward, three kernels:

1. ``dwconv_gelu_gate_bwd_gate_kernel`` recomputes a and b per tile, forms the gradient of the
   convolution output, ``grad_a = g * b * gelu'(a)`` (gelu'(a) = Phi(a) + a * phi(a)) and
   ``grad_b = g * gelu(a)``, writes it ([B, 2 * Ch, H, W], float32 or 64) and, while x's tile is still
   in L1/L2, each tile's K^2 weight-tap sums and bias sum into float32 partial-sum buffers.
2. grad x is the depthwise convolution of that gradient with the flipped kernel: grouped_dwconv's
   forward kernel (one expert, ``FLIP``).
3. grouped_dwconv's reduction sums the partial sums per channel over images and tiles in a fixed
   order: grad weight / grad bias are deterministic, without atomics.

Fusing the weight-tap sums into launch 1 (rather than running grouped_dwconv's whole backward on
the written gradient) saves a second read of x and of the gradient. The gradient is kept in
float32 for every input dtype, so grad x rounds once, like the reference (in x's dtype it would
move ~30% fewer bytes in bf16 at the price of a second rounding).
``custom_op`` rather than ``triton_op``: see ``moce_kernels/_library.py``.
"""

from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

from moce_kernels import _library
from moce_kernels.dwconv_gelu_gate import _autograd

# By path: ``moce_kernels.grouped_dwconv`` the attribute is the function, not the package.
dw = importlib.import_module("moce_kernels.grouped_dwconv.triton")

#: 1 / sqrt(2) and 1 / sqrt(2 * pi): the standard normal's distribution and density.
_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)


@triton.jit
def _normal_cdf_pdf(a):
    """(Phi(a), phi(a)): gelu(a) = a * Phi(a), gelu'(a) = Phi(a) + a * phi(a)."""
    cdf = 0.5 * (1.0 + tl.erf(a * _SQRT1_2))
    pdf = tl.exp(-0.5 * a * a) * _INV_SQRT_2PI
    return cdf, pdf


@triton.jit
def _tile(
    CH, H, W, c_blocks, tiles_w, tiles, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr
):
    """(image, tile id, gate channels [BLOCK_C], rows [BLOCK_H], columns [BLOCK_W], in-image mask
    [BLOCK_C, BLOCK_H, BLOCK_W]) of this program; programs = (image, channel block, tile), the
    tile fastest (neighbouring programs share their halo in L2)."""
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    c_block = (pid // tiles) % c_blocks
    n = pid // (tiles * c_blocks)
    chans = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    hs = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    ws = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    inside = ((chans < CH)[:, None] & (hs < H)[None, :])[:, :, None] & (ws < W)[None, None, :]
    return n, tile, chans, hs, ws, inside


@triton.jit
def _pair_taps(a, b, planes_a, planes_b, w_a, w_b, chan_ok, hs, ws, H, W, K: tl.constexpr):
    """a += x_a (*) w_a and b += x_b (*) w_b: the K x K correlations of both halves' planes
    (``planes_*``, ``w_*``: [BLOCK_C] pointers to the channels' planes / kernels), zero padding."""
    R: tl.constexpr = K // 2
    for i in range(K):
        ih = hs + (i - R)
        row_ok = (chan_ok[:, None] & ((ih >= 0) & (ih < H))[None, :])[:, :, None]
        # One pointer tensor per kernel row, its taps at constant offsets from it (sm_90: 64
        # rather than 89 registers in the backward at 3x3, 78 rather than 64 in the forward).
        offs = (ih * W)[None, :, None] + ws[None, None, :]
        row_a = planes_a[:, None, None] + offs
        row_b = planes_b[:, None, None] + offs
        for j in tl.static_range(K):
            iw = ws + (j - R)
            # Both halves per tap: its halo mask serves the two loads and then dies.
            mask = row_ok & ((iw >= 0) & (iw < W))[None, None, :]
            xa = tl.load(row_a + (j - R), mask=mask, other=0.0)
            xb = tl.load(row_b + (j - R), mask=mask, other=0.0)
            wa = tl.load(w_a + (i * K + j), mask=chan_ok, other=0.0)
            wb = tl.load(w_b + (i * K + j), mask=chan_ok, other=0.0)
            a += xa.to(a.dtype) * wa.to(a.dtype)[:, None, None]
            b += xb.to(b.dtype) * wb.to(b.dtype)[:, None, None]
    return a, b


@triton.jit
def _pair_weight_taps(ga, gb, planes_a, planes_b, sums_a, sums_b, chan_ok, hs, ws, H, W, K: tl.constexpr):
    """sums_*[c, i, j] = sum over the tile of g_*[c, h, w] * x_*[c, h + i - R, w + j - R] for both
    halves (``sums_*``: [BLOCK_C] pointers to each channel's K x K partial sums); the loads as in
    ``_pair_taps``."""
    R: tl.constexpr = K // 2
    for i in range(K):
        ih = hs + (i - R)
        row_ok = (chan_ok[:, None] & ((ih >= 0) & (ih < H))[None, :])[:, :, None]
        offs = (ih * W)[None, :, None] + ws[None, None, :]
        row_a = planes_a[:, None, None] + offs
        row_b = planes_b[:, None, None] + offs
        for j in tl.static_range(K):
            iw = ws + (j - R)
            mask = row_ok & ((iw >= 0) & (iw < W))[None, None, :]
            xa = tl.load(row_a + (j - R), mask=mask, other=0.0)
            xb = tl.load(row_b + (j - R), mask=mask, other=0.0)
            tl.store(sums_a + (i * K + j), tl.sum(tl.sum(ga * xa.to(ga.dtype), 2), 1), mask=chan_ok)
            tl.store(sums_b + (i * K + j), tl.sum(tl.sum(gb * xb.to(gb.dtype), 2), 1), mask=chan_ok)


@triton.jit
def _gate_inputs(
    x_ptr, w_ptr, b_ptr, n, chans, hs, ws, CH, H, W,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """(a, b): the depthwise convolutions of channels ``chans`` and ``chans + CH`` of image n
    over the tile, bias included, in ACC."""
    chan_ok = chans < CH
    planes_a = x_ptr + (n * 2 * CH + chans) * H * W
    planes_b = x_ptr + (n * 2 * CH + CH + chans) * H * W
    zero = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=ACC)
    w_a = w_ptr + chans * (K * K)
    w_b = w_ptr + (CH + chans) * (K * K)
    a, b = _pair_taps(zero, zero, planes_a, planes_b, w_a, w_b, chan_ok, hs, ws, H, W, K)
    if HAS_BIAS:
        a += tl.load(b_ptr + chans, mask=chan_ok, other=0.0).to(ACC)[:, None, None]
        b += tl.load(b_ptr + CH + chans, mask=chan_ok, other=0.0).to(ACC)[:, None, None]
    return a, b


@triton.jit
def dwconv_gelu_gate_fwd_kernel(
    x_ptr,  # [B, 2 * CH, H, W]
    w_ptr,  # [2 * CH, K, K]
    b_ptr,  # [2 * CH] (unused without HAS_BIAS)
    y_ptr,  # [B, CH, H, W]
    CH,
    H,
    W,
    c_blocks,
    tiles_w,
    tiles,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ACC: tl.constexpr,
):
    n, tile, chans, hs, ws, inside = _tile(CH, H, W, c_blocks, tiles_w, tiles, BLOCK_C, BLOCK_H, BLOCK_W)
    a, b = _gate_inputs(
        x_ptr, w_ptr, b_ptr, n, chans, hs, ws, CH, H, W, K, HAS_BIAS, BLOCK_C, BLOCK_H, BLOCK_W, ACC
    )
    cdf, _ = _normal_cdf_pdf(a)
    rows = ((n * CH + chans) * H * W)[:, None] + (hs * W)[None, :]
    tl.store(
        y_ptr + rows[:, :, None] + ws[None, None, :], (a * cdf * b).to(y_ptr.dtype.element_ty), mask=inside
    )


@triton.jit
def dwconv_gelu_gate_bwd_gate_kernel(
    x_ptr,  # [B, 2 * CH, H, W]
    w_ptr,  # [2 * CH, K, K]
    b_ptr,  # [2 * CH] (unused without HAS_BIAS)
    gy_ptr,  # [B, CH, H, W]
    gc_ptr,  # [B, 2 * CH, H, W] ACC: the gradient of the convolution output
    part_w_ptr,  # [B * 2 * CH, tiles, K * K] ACC: per-tile weight-tap sums
    part_b_ptr,  # [B * 2 * CH, tiles] ACC: per-tile sums of the gradient
    CH,
    H,
    W,
    c_blocks,
    tiles_w,
    tiles,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ACC: tl.constexpr,
):
    n, tile, chans, hs, ws, inside = _tile(CH, H, W, c_blocks, tiles_w, tiles, BLOCK_C, BLOCK_H, BLOCK_W)
    chan_ok = chans < CH
    a, b = _gate_inputs(
        x_ptr, w_ptr, b_ptr, n, chans, hs, ws, CH, H, W, K, HAS_BIAS, BLOCK_C, BLOCK_H, BLOCK_W, ACC
    )
    pixels = (hs * W)[None, :, None] + ws[None, None, :]
    gy_rows = ((n * CH + chans) * H * W)[:, None, None]
    g = tl.load(gy_ptr + gy_rows + pixels, mask=inside, other=0.0).to(ACC)
    cdf, pdf = _normal_cdf_pdf(a)
    # Past the image's edge g is 0, but a and b there come from real pixels of the halo (an Inf
    # would make 0 * Inf = NaN): exact zeros, so that the tile sums below see nothing there.
    grad_a = tl.where(inside, g * b * (cdf + a * pdf), 0.0)
    grad_b = tl.where(inside, g * a * cdf, 0.0)
    plane_a = (n * 2 * CH + chans) * H * W  # [BLOCK_C]
    plane_b = (n * 2 * CH + CH + chans) * H * W
    tl.store(gc_ptr + plane_a[:, None, None] + pixels, grad_a, mask=inside)
    tl.store(gc_ptr + plane_b[:, None, None] + pixels, grad_b, mask=inside)
    # Rows of the partial-sum buffers: (image, conv channel), as grouped_dwconv's reduction reads them.
    slot_a = (n * 2 * CH + chans) * tiles + tile
    slot_b = (n * 2 * CH + CH + chans) * tiles + tile
    tl.store(part_b_ptr + slot_a, tl.sum(tl.sum(grad_a, 2), 1), mask=chan_ok)
    tl.store(part_b_ptr + slot_b, tl.sum(tl.sum(grad_b, 2), 1), mask=chan_ok)
    _pair_weight_taps(
        grad_a, grad_b, x_ptr + plane_a, x_ptr + plane_b, part_w_ptr + slot_a * (K * K),
        part_w_ptr + slot_b * (K * K), chan_ok, hs, ws, H, W, K,
    )  # fmt: skip


# --- host launchers ------------------------------------------------------------------------------


def _check_layout(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """What the kernels assume (``moce_kernels.dwconv_gelu_gate`` checks more, with its messages)."""
    if x.dim() != 4 or x.shape[1] % 2:
        raise ValueError(f"x must be [B, 2 * Ch, H, W], got shape {tuple(x.shape)}")
    k = weight.shape[-1] if weight.dim() == 3 else 0
    if weight.shape != (x.shape[1], k, k) or k not in dw.KERNEL_SIZES:
        raise ValueError(
            f"weight must be [2 * Ch, K, K] = [{x.shape[1]}, K, K], K in {dw.KERNEL_SIZES}; "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")


def _gate_blocks(gate: int, height: int, width: int) -> dict[str, int]:
    """grouped_dwconv's tiling (fixed by the shape: the partial sums, and with them the weight
    gradient's bits, are the same on every run) with half its elements per accumulator: a
    program holds two, a and b (1024 elements each on a GPU: 4 per thread at 8 warps)."""
    b = dw._blocks(gate, height, width)
    budget = max(1, dw._tile_budget() // 2 // (b["block_h"] * b["block_w"]))
    block_c = min(triton.next_power_of_2(gate), budget)
    return dict(b, block_c=block_c, c_blocks=triton.cdiv(gate, block_c))


def _launch_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(grid, runtime arguments after the pointers, constexprs) of the two gate kernels."""
    batch, channels, height, width = x.shape
    b = _gate_blocks(channels // 2, height, width)
    grid = (batch * b["c_blocks"] * b["tiles"],)
    ints = (channels // 2, height, width, b["c_blocks"], b["tiles_w"], b["tiles"])
    consts = dict(
        K=weight.shape[-1], HAS_BIAS=bias is not None, BLOCK_C=b["block_c"], BLOCK_H=b["block_h"],
        BLOCK_W=b["block_w"], ACC=dw._acc_dtype(x)[1], num_warps=dw._CONV_WARPS,
    )  # fmt: skip
    return grid, ints, consts


def dwconv_gelu_gate_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [B, Ch, H, W] in x's dtype (see ``moce_kernels.dwconv_gelu_gate``)."""
    _check_layout(x, weight, bias)
    x, weight = x.contiguous(), weight.contiguous()
    batch, channels, height, width = x.shape
    y = torch.empty((batch, channels // 2, height, width), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    grid, ints, consts = _launch_args(x, weight, bias)
    with dw._device_guard(x):
        dwconv_gelu_gate_fwd_kernel[grid](
            x, weight, x if bias is None else bias.contiguous(), y, *ints, **consts
        )
    return y


def dwconv_gelu_gate_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x [B, 2 * Ch, H, W] in x's dtype, grad weight [2 * Ch, K, K] and grad bias [2 * Ch]
    in weight's dtype; grad bias is zeros when bias is None). The same bits on every run."""
    _check_layout(x, weight, bias)
    grad_y, x, weight = grad_y.contiguous(), x.contiguous(), weight.contiguous()
    batch, channels, height, width = x.shape
    if tuple(grad_y.shape) != (batch, channels // 2, height, width):
        raise ValueError(
            f"grad_y must have shape {(batch, channels // 2, height, width)}, got {tuple(grad_y.shape)}"
        )
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    grad_bias = torch.empty((channels,), dtype=weight.dtype, device=weight.device)
    if x.numel() == 0:
        return grad_x, grad_weight.zero_(), grad_bias.zero_()
    acc = dw._acc_dtype(x)[0]
    grid, ints, consts = _launch_args(x, weight, bias)
    tiles, k = ints[-1], weight.shape[-1]
    # Every element of these is written by the gate kernel (all channels, all tiles, all taps).
    grad_conv = torch.empty(x.shape, dtype=acc, device=x.device)
    part_w = torch.empty((batch * channels, tiles, k * k), dtype=acc, device=x.device)
    part_b = torch.empty((batch * channels, tiles), dtype=acc, device=x.device)
    with dw._device_guard(x):
        dwconv_gelu_gate_bwd_gate_kernel[grid](
            x, weight, x if bias is None else bias.contiguous(), grad_y, grad_conv, part_w, part_b,
            *ints, **consts,
        )  # fmt: skip
        _as_one_expert(grad_conv, weight, part_w, part_b, grad_x, grad_weight, grad_bias)
    if bias is None:
        grad_bias.zero_()
    return grad_x, grad_weight, grad_bias


def _as_one_expert(grad_conv, weight, part_w, part_b, grad_x, grad_weight, grad_bias) -> None:
    """grad x and the reduction of the partial sums on grouped_dwconv's kernels, with one expert
    (rows [0, B), all 2 * Ch channels, kernel size K). The first backward of a (2 * Ch, K) on a
    device copies that metadata to it (cached afterwards, as in grouped_dwconv): run one before
    capturing a CUDA graph."""
    batch, channels, height, width = grad_conv.shape
    k = weight.shape[-1]
    acc = dw._acc_dtype(grad_conv)[1]
    # offsets [0, B] made on the device: no host-to-device copy per call (CUDA-graph safe).
    offsets = torch.arange(2, dtype=torch.int64, device=grad_conv.device) * batch
    meta = dw._metadata((channels,), (k,), grad_conv.device)
    kernel_set = dw._kernel_set([k])
    b = dw._blocks(channels, height, width)
    dw.grouped_dwconv_fwd_kernel[(batch * b["c_blocks"] * b["tiles"],)](
        grad_conv, weight, grad_conv, offsets, meta, grad_x,
        channels, height, width, 1, b["c_blocks"], b["tiles_w"], b["tiles"],
        K_MAX=k, KERNEL_SET=kernel_set, HAS_BIAS=False, FLIP=True, BLOCK_E=1, BLOCK_C=b["block_c"],
        BLOCK_H=b["block_h"], BLOCK_W=b["block_w"], ACC=acc, num_warps=dw._CONV_WARPS,
    )  # fmt: skip
    # The same reduction blocks as grouped_dwconv_bwd: a fixed order for a given shape.
    tiles = part_b.shape[1]
    block_t = triton.next_power_of_2(k * k)
    block_tiles = min(dw._REDUCE_BLOCK_TILES, triton.next_power_of_2(tiles))
    reduce_c = min(triton.next_power_of_2(channels), max(1, dw._tile_budget() // (block_tiles * block_t)))
    reduce_blocks = triton.cdiv(channels, reduce_c)
    dw.grouped_dwconv_bwd_reduce_kernel[(reduce_blocks,)](
        part_w, part_b, offsets, meta, grad_weight, grad_bias, channels, 1, reduce_blocks, tiles,
        K_MAX=k, BLOCK_C=reduce_c, BLOCK_TILES=block_tiles, BLOCK_T=block_t, ACC=acc, num_warps=4,
    )  # fmt: skip


# --- torch.library registration ----------------------------------------------------------------


def _dwconv_gelu_gate_fwd_fake(x, weight, bias):
    batch, channels, height, width = x.shape
    return x.new_empty((batch, channels // 2, height, width))


def _dwconv_gelu_gate_bwd_fake(grad_y, x, weight, bias):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


_library.define_triton(
    "dwconv_gelu_gate",
    dwconv_gelu_gate_fwd,
    dwconv_gelu_gate_bwd,
    _dwconv_gelu_gate_fwd_fake,
    _dwconv_gelu_gate_bwd_fake,
    _autograd,
)


def dwconv_gelu_gate_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The GDFN's depthwise convolution and gate in one Triton launch (GPU, or the interpreter).

    Arguments as ``moce_kernels.dwconv_gelu_gate`` (which validates them first): x [B, 2 * Ch,
    H, W], weight [2 * Ch, K, K] and bias [2 * Ch] (or None) in x's dtype, K odd in 3..9.
    Non-contiguous inputs are copied to contiguous first. Returns [B, Ch, H, W] contiguous in x's
    dtype; differentiable in x, weight and bias (the backward recomputes the convolution).
    """
    return torch.ops.moce_triton.dwconv_gelu_gate_fwd(
        x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()
    )
