"""``grouped_pointwise`` in Triton: ``torch.ops.moce_triton.grouped_pointwise_fwd`` / ``_bwd``.

A grouped GEMM over the packed rows that never reads the offsets on the host. Row n of expert e is
one [Cout_e, Cin_e] x [Cin_e, H*W] product: a program owns a tile of BLOCK_M output channels and
BLOCK_P contiguous pixels of one row (loads coalesced along the pixels). It finds its row's expert
on the device, ``e = #{experts whose rows end at or before n}`` over the E + 1 offsets, then that
expert's widths from a small cached int32 device tensor, and loops over the expert's input
channels in BLOCK_K chunks (masked past ``in_channels[e]``), accumulating ``tl.dot(w, x)`` in
float32. A tile wholly past ``out_channels[e]`` stores zeros and skips the GEMM, so a narrow
expert pays for its own width (rounded up to a tile), not for the widest one.

Backward:
- grad x is the same kernel on grad y with the transposed weight (``TRANSPOSE``): row n gets
  ``W_e[:out_e, :in_e]^T @ grad_y[n, :out_e]``, exact zeros past ``in_channels[e]``.
- grad weight / grad bias are deterministic without atomics, in two stages.
  ``grouped_pointwise_bwd_weight_kernel``: a program per (row, chunk of pixels, BLOCK_O x BLOCK_I
  tile) writes ``grad_y_tile @ x_tile^T`` summed over its chunk (and, for the first input tile,
  the chunk's sums of grad y) into float32 partial-sum buffers; only the entries inside the row's
  expert block are written. ``grouped_pointwise_bwd_reduce_kernel``: a program per (expert, tile)
  sums its rows ``offsets[e]..offsets[e + 1]`` (bounds loaded on the device) and their chunks in
  a fixed order, and writes exact zeros outside the expert's (out, in) block and for experts
  without rows. One program per expert over all its rows would leave most of a GPU idle (E x a
  few tiles programs, each over every pixel of its rows); the chunks spread that work.

Block sizes are fixed by the shape (no autotuning), so the partial sums, and with them the bits
of the gradients, are the same on every run.

Dtypes: float32 / bfloat16 / float16 with float32 accumulation; float32 products use
``input_precision="ieee"`` (no TF32), so the results match the reference to float32 rounding.
float64 (for gradcheck) is accumulated in float64 with a broadcast-multiply-sum instead of
``tl.dot`` (kept off tl.dot, whose float64 support depends on the Triton version and GPU).
Non-contiguous inputs are copied to contiguous NCHW first. ``custom_op`` rather than
``triton_op``: see ``moce_kernels/layernorm2d/triton.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.grouped_pointwise import _autograd

# Shared with the other Triton bindings (moce_kernels/_triton_common.py).
_acc_dtype = _triton_common.acc_dtype
_device_guard = _triton_common.device_guard
_empty = _triton_common.empty
_metadata = _triton_common.expert_metadata
_expert_of_row = _triton_common.expert_of_row
_interpreted = _triton_common.interpreted

#: Largest tiles on a GPU: BLOCK_M result channels (output channels; input channels for grad x),
#: BLOCK_K channels per tl.dot, BLOCK_P contiguous pixels (256 bytes of bfloat16 per channel).
_BLOCK_M = 64
_BLOCK_K = 32
_BLOCK_P = 128
#: The weight gradient's pixels per step (its tl.dot's K): with [64, P] and [32, P] operand tiles
#: (bf16, 8 warps) P = 128 takes 255 registers, 64 ~180, 32 ~105 (two programs per SM).
_WEIGHT_BLOCK_P = 32
#: tl.dot's smallest operand side.
_MIN_DOT = 16
#: The same under the Triton interpreter (CPU tests), which pays per program and per operation
#: rather than per element, and has no registers to run out of.
_INTERPRETER_BLOCK_M = 128
_INTERPRETER_BLOCK_K = 128
_INTERPRETER_BLOCK_P = 1024
#: float64 multiplies a [BLOCK_M, BLOCK_K, BLOCK_P] broadcast product (no tl.dot): small tiles.
_FP64_BLOCK_M = 16
_FP64_BLOCK_K = 8
_FP64_BLOCK_P = 32
#: Weight gradient: pixels per chunk of a row (one first-stage program each), and the most chunks
#: per row (bounds the partial sums at N * _MAX_CHUNKS * Cout_max * Cin_max floats).
_CHUNK_PIXELS = 4096
_MAX_CHUNKS = 16
#: 8 warps: ptxas gives 120-150 registers and no spills on sm_90 to the row kernel's [64, 128]
#: tile (bf16 / fp16 on wgmma, fp32 on FMA), where 4 warps take 255. float64's broadcast product
#: spills with 8 warps and not with 4.
_NUM_WARPS = 8
_FP64_NUM_WARPS = 4
#: The reduction's few programs each sum a [64, 32] tile over rows * chunks: 4 warps (~145
#: registers), where 8 spill a few bytes under Triton 3.6.
_REDUCE_NUM_WARPS = 4


@triton.jit
def mma(acc, a, b, USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc [M, N] + a [M, K] @ b [K, N]: tl.dot into float32 (IEEE, no TF32), or for float64 a
    broadcast product summed over K (see the module docstring). ``DOT_UPCAST``: the operands go
    to tl.dot as float32 (the interpreter multiplies bfloat16 as its raw uint16 bits; products
    of bfloat16 values are exact in float32, so only the order of the sums can differ)."""
    if USE_DOT:
        if DOT_UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], 1)
    return acc


@triton.jit
def expert_tile_product(
    acc, w_rows, w_k_stride, m_ok, a_row, ps, p_ok, P, k_e,
    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_M, BLOCK_P] + W[ms, :k_e] @ a[:k_e, ps]: ``w_rows`` points at the weight rows
    (consecutive K entries ``w_k_stride`` apart), ``a_row`` at a [K, P] input row; BLOCK_K
    channels per step. Masked past the expert's K width: whatever lies there (NaN included) is
    never read. Shared by the row kernel and pointwise_combine's."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, k_e, BLOCK_K):
        k_ok = (k0 + ks) < k_e
        w = tl.load(
            w_rows[:, None] + ((k0 + ks) * w_k_stride)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        a = tl.load(
            a_row + ((k0 + ks) * P)[:, None] + ps[None, :], mask=k_ok[:, None] & p_ok[None, :], other=0.0
        )
        acc = mma(acc, w.to(a.dtype), a, USE_DOT, DOT_UPCAST)
    return acc


@triton.jit
def grouped_pointwise_rows_kernel(
    a_ptr,  # [N, K_MAX, P]: x (forward) or grad y (grad x); [B, K_MAX, P] images with GATHER
    src_ptr,  # [N] int64: the image each row reads (GATHER only)
    w_ptr,  # [E, C_OUT, C_IN]
    b_ptr,  # [E, C_OUT] (unused without HAS_BIAS)
    off_ptr,  # [E + 1] int32 / int64 row offsets
    meta_ptr,  # [2 * E] int32: input widths, then output widths
    y_ptr,  # [N, M_MAX, P]: y (forward) or grad x
    C_IN,
    C_OUT,
    P,
    E,
    m_blocks,
    TRANSPOSE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    # Program = (row, pixel tile, channel tile), the channel tile fastest: neighbouring programs
    # read the same [K, BLOCK_P] input tile, which then comes from L2. Offsets inside a row are
    # int32 (a row's K_MAX * P elements fit), the row's start int64: fewer registers than
    # int64 offsets per element.
    pid = tl.program_id(0)
    p_tiles = tl.cdiv(P, BLOCK_P)
    m_block = pid % m_blocks
    p_block = (pid // m_blocks) % p_tiles
    row = (pid // (m_blocks * p_tiles)).to(tl.int64)
    e, in_e, out_e = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
    # The forward is y = W_e a over K = input channels; grad x is W_e^T a over K = output channels.
    if TRANSPOSE:
        M_MAX = C_IN
        K_MAX = C_OUT
        m_e = in_e
        k_e = out_e
        w_m_stride = 1
        w_k_stride = C_IN
    else:
        M_MAX = C_OUT
        K_MAX = C_IN
        m_e = out_e
        k_e = in_e
        w_m_stride = C_IN
        w_k_stride = 1
    ms = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    ps = p_block * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    p_ok = ps < P
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    # A tile wholly past the expert's width keeps acc = 0: the exact zeros of the contract.
    if m_block * BLOCK_M < m_e:
        m_ok = ms < m_e
        w_rows = w_ptr + e * C_OUT * C_IN + ms * w_m_stride  # [BLOCK_M]
        # GATHER: the dispatch fused into the load; row n reads image src[n] (no dispatch copy).
        if GATHER:
            src = tl.load(src_ptr + row).to(tl.int64)
        else:
            src = row
        a_row = a_ptr + src * K_MAX * P
        acc = expert_tile_product(
            acc, w_rows, w_k_stride, m_ok, a_row, ps, p_ok, P, k_e, BLOCK_K, USE_DOT, DOT_UPCAST
        )
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * C_OUT + ms, mask=m_ok, other=0.0).to(ACC)[:, None]
    out = y_ptr + row * M_MAX * P + (ms * P)[:, None] + ps[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(ms < M_MAX)[:, None] & p_ok[None, :])


@triton.jit
def grouped_pointwise_bwd_weight_kernel(
    x_ptr,  # [N, C_IN, P]; [B, C_IN, P] images with GATHER
    src_ptr,  # [N] int64: the image each row reads (GATHER only)
    gy_ptr,  # [N, C_OUT, P]
    off_ptr,  # [E + 1]
    meta_ptr,  # [2 * E] int32
    part_w_ptr,  # [N, chunks, C_OUT, C_IN] ACC: per-chunk sums of gy x^T
    part_b_ptr,  # [N, chunks, C_OUT] ACC: per-chunk sums of gy
    C_IN,
    C_OUT,
    P,
    E,
    o_blocks,
    i_blocks,
    chunks,
    chunk_len,  # pixels per chunk, a multiple of BLOCK_P
    GATHER: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    # Program = (row, chunk, output tile, input tile), the input tile fastest. int32 offsets
    # inside a row / a partial sum, int64 starts (as in the row kernel).
    pid = tl.program_id(0)
    i_block = pid % i_blocks
    o_block = (pid // i_blocks) % o_blocks
    chunk = (pid // (i_blocks * o_blocks)) % chunks
    row = (pid // (i_blocks * o_blocks * chunks)).to(tl.int64)
    e, in_e, out_e = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
    # Tiles outside the expert's block write nothing: the reduction never reads them.
    if (o_block * BLOCK_O < out_e) & (i_block * BLOCK_I < in_e):
        o_ch = o_block * BLOCK_O + tl.arange(0, BLOCK_O)  # [BLOCK_O]
        i_ch = i_block * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
        o_ok = o_ch < out_e
        i_ok = i_ch < in_e
        gy_rows = gy_ptr + row * C_OUT * P + o_ch * P  # [BLOCK_O]
        if GATHER:
            src = tl.load(src_ptr + row).to(tl.int64)
        else:
            src = row
        x_rows = x_ptr + src * C_IN * P + i_ch * P  # [BLOCK_I]
        acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
        acc_b = tl.zeros([BLOCK_O], dtype=ACC)
        start = chunk * chunk_len
        for p0 in range(start, tl.minimum(start + chunk_len, P), BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            p_ok = ps < P
            gy = tl.load(gy_rows[:, None] + ps[None, :], mask=o_ok[:, None] & p_ok[None, :], other=0.0)
            xv = tl.load(x_rows[:, None] + ps[None, :], mask=i_ok[:, None] & p_ok[None, :], other=0.0)
            acc = mma(acc, gy, tl.trans(xv.to(gy.dtype)), USE_DOT, DOT_UPCAST)
            acc_b += tl.sum(gy.to(ACC), 1)
        part = row * chunks + chunk
        w_out = part_w_ptr + part * C_OUT * C_IN + (o_ch * C_IN)[:, None] + i_ch[None, :]
        tl.store(w_out, acc, mask=o_ok[:, None] & i_ok[None, :])
        if i_block == 0:
            tl.store(part_b_ptr + part * C_OUT + o_ch, acc_b, mask=o_ok)


@triton.jit
def grouped_pointwise_bwd_reduce_kernel(
    part_w_ptr,  # [N, chunks, C_OUT, C_IN] ACC
    part_b_ptr,  # [N, chunks, C_OUT] ACC
    off_ptr,  # [E + 1]
    meta_ptr,  # [2 * E] int32
    gw_ptr,  # [E, C_OUT, C_IN]
    gb_ptr,  # [E, C_OUT]
    C_IN,
    C_OUT,
    E,
    o_blocks,
    i_blocks,
    chunks,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    ACC: tl.constexpr,
):
    # One program per (expert, tile): the expert's rows in order, each row's chunks in order:
    # the same sequence of additions on every run.
    pid = tl.program_id(0).to(tl.int64)
    i_block = pid % i_blocks
    o_block = (pid // i_blocks) % o_blocks
    e = pid // (i_blocks * o_blocks)
    lo = tl.load(off_ptr + e).to(tl.int64)
    hi = tl.load(off_ptr + e + 1).to(tl.int64)
    in_e = tl.load(meta_ptr + e)
    out_e = tl.load(meta_ptr + E + e)
    o_ch = o_block * BLOCK_O + tl.arange(0, BLOCK_O)
    i_ch = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = o_ch < out_e
    ok = o_ok[:, None] & (i_ch < in_e)[None, :]
    # Tiles outside the expert's block were never written: they sum nothing (exact zeros).
    hi_w = tl.where((o_block * BLOCK_O < out_e) & (i_block * BLOCK_I < in_e), hi, lo)
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    tile = (o_ch * C_IN)[:, None] + i_ch[None, :]
    for part in range(lo * chunks, hi_w * chunks):
        acc += tl.load(part_w_ptr + part * C_OUT * C_IN + tile, mask=ok, other=0.0)
    gw_ok = (o_ch < C_OUT)[:, None] & (i_ch < C_IN)[None, :]
    tl.store(gw_ptr + e * C_OUT * C_IN + tile, acc.to(gw_ptr.dtype.element_ty), mask=gw_ok)
    if i_block == 0:
        hi_b = tl.where(o_block * BLOCK_O < out_e, hi, lo)
        acc_b = tl.zeros([BLOCK_O], dtype=ACC)
        for part in range(lo * chunks, hi_b * chunks):
            acc_b += tl.load(part_b_ptr + part * C_OUT + o_ch, mask=o_ok, other=0.0)
        tl.store(gb_ptr + e * C_OUT + o_ch, acc_b.to(gb_ptr.dtype.element_ty), mask=o_ch < C_OUT)


# --- host launchers ------------------------------------------------------------------------------


def _limits(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(largest BLOCK_M, BLOCK_K, BLOCK_P, weight-gradient BLOCK_P; smallest block) for ``dtype``."""
    if dtype == torch.float64:
        return _FP64_BLOCK_M, _FP64_BLOCK_K, _FP64_BLOCK_P, _FP64_BLOCK_P, 1
    if _interpreted():
        p = _INTERPRETER_BLOCK_P
        return _INTERPRETER_BLOCK_M, _INTERPRETER_BLOCK_K, p, p, _MIN_DOT
    return _BLOCK_M, _BLOCK_K, _BLOCK_P, _WEIGHT_BLOCK_P, _MIN_DOT


def _num_warps(dtype: torch.dtype) -> int:
    return _FP64_NUM_WARPS if dtype == torch.float64 else _NUM_WARPS


def _dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """USE_DOT (not for float64) and DOT_UPCAST (bfloat16 under the interpreter) of a kernel."""
    return dict(USE_DOT=dtype != torch.float64, DOT_UPCAST=_interpreted() and dtype == torch.bfloat16)


def _block(size: int, largest: int, smallest: int) -> int:
    """The power of two that covers ``size``, clamped to smallest..largest."""
    return max(smallest, min(largest, triton.next_power_of_2(max(size, 1))))


def _rows_blocks(c_m: int, c_k: int, pixels: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles of the row kernel: ``c_m`` result channels, ``c_k`` summed channels."""
    largest_m, largest_k, largest_p, _, smallest = _limits(dtype)
    block_m = _block(c_m, largest_m, smallest)
    block_p = _block(pixels, largest_p, smallest)
    return dict(
        block_m=block_m,
        block_k=_block(c_k, largest_k, smallest),
        block_p=block_p,
        m_blocks=triton.cdiv(c_m, block_m),
        p_blocks=triton.cdiv(pixels, block_p),
    )


def _weight_blocks(c_in: int, c_out: int, pixels: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles and pixel chunks of the weight gradient (fixed by the shape: deterministic sums)."""
    largest_o, largest_i, _, largest_p, smallest = _limits(dtype)
    block_o = _block(c_out, largest_o, smallest)
    block_i = _block(c_in, largest_i, smallest)
    block_p = _block(pixels, largest_p, smallest)
    chunk_len = triton.cdiv(_CHUNK_PIXELS, block_p) * block_p
    if triton.cdiv(pixels, chunk_len) > _MAX_CHUNKS:
        chunk_len = triton.cdiv(triton.cdiv(pixels, _MAX_CHUNKS), block_p) * block_p
    return dict(
        block_o=block_o,
        block_i=block_i,
        block_p=block_p,
        o_blocks=triton.cdiv(c_out, block_o),
        i_blocks=triton.cdiv(c_in, block_i),
        chunk_len=chunk_len,
        chunks=triton.cdiv(pixels, chunk_len),
    )


def _check_layout(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, in_channels, out_channels):
    if x.dim() != 4 or weight.dim() != 3:
        raise ValueError(f"x must be 4-D and weight 3-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    num_experts = weight.shape[0]
    if (
        offsets.shape != (num_experts + 1,)
        or len(in_channels) != num_experts
        or len(out_channels) != num_experts
    ):
        raise ValueError(
            f"offsets must be [E + 1] and in / out channels E long for E = {num_experts}, got "
            f"{tuple(offsets.shape)}, {len(in_channels)}, {len(out_channels)}"
        )
    if weight.shape[2] != x.shape[1]:
        raise ValueError(f"weight must be [E, Cout_max, Cin_max = {x.shape[1]}], got {tuple(weight.shape)}")
    if any(not 1 <= c <= x.shape[1] for c in in_channels) or any(
        not 1 <= c <= weight.shape[1] for c in out_channels
    ):
        raise ValueError("each input width must be in 1..Cin_max and each output width in 1..Cout_max")


def launch_rows(a, weight, bias, offsets, meta, out, *, transpose: bool, src=None) -> None:
    """``out`` = every row's W_e a (W_e^T a with ``transpose``), + bias, zeros past its width.

    ``src``: [N] int64 device tensor, row n reads ``a[src[n]]`` (a holds images: the gather of
    ``dispatch_pointwise``); None reads ``a[n]``.
    """
    num_experts, c_out, c_in = weight.shape
    rows, c_m = out.shape[0], out.shape[1]
    pixels = out.shape[2] * out.shape[3]
    # int32 offsets inside a row: an error rather than wrapped offsets (wrong memory).
    _triton_common.check_int32_offsets("grouped_pointwise", "the input", a.shape[1] * pixels, tuple(a.shape))
    _triton_common.check_int32_offsets("grouped_pointwise", "the output", c_m * pixels, tuple(out.shape))
    b = _rows_blocks(c_m, a.shape[1], pixels, a.dtype)
    grouped_pointwise_rows_kernel[(rows * b["p_blocks"] * b["m_blocks"],)](
        a, a if src is None else src, weight, a if bias is None else bias, offsets, meta, out,
        c_in, c_out, pixels, num_experts, b["m_blocks"],
        TRANSPOSE=transpose, HAS_BIAS=bias is not None, GATHER=src is not None, **_dot_flags(a.dtype),
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_M=b["block_m"], BLOCK_K=b["block_k"],
        BLOCK_P=b["block_p"], ACC=_acc_dtype(a)[1], num_warps=_num_warps(a.dtype),
    )  # fmt: skip


def grouped_pointwise_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    in_channels: list[int],
    out_channels: list[int],
) -> torch.Tensor:
    """y [N, Cout_max, H, W] in x's dtype (see ``moce_kernels.grouped_pointwise``)."""
    _check_layout(x, weight, offsets, in_channels, out_channels)
    x, weight, offsets = x.contiguous(), weight.contiguous(), offsets.contiguous()
    rows, _, height, width = x.shape
    y = _empty((rows, weight.shape[1], height, width), x.dtype, x.device)
    if y.numel() == 0:
        return y
    meta = _metadata(tuple(in_channels), tuple(out_channels), x.device)
    bias = None if bias is None else bias.contiguous()
    with _device_guard(x):
        launch_rows(x, weight, bias, offsets, meta, y, transpose=False)
    return y


def grouped_pointwise_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    in_channels: list[int],
    out_channels: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x [N, Cin_max, H, W], grad weight [E, Cout_max, Cin_max], grad bias [E, Cout_max]).

    Grad weight and grad bias in weight's dtype, zero outside each expert's (out, in) block and
    for experts without rows; the same bits on every run.
    """
    _check_layout(x, weight, offsets, in_channels, out_channels)
    grad_y, x, weight, offsets = (t.contiguous() for t in (grad_y, x, weight, offsets))
    grad_x = _empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return grad_x, *weight_grads(grad_y, x, weight, offsets, None)
    meta = _metadata(tuple(in_channels), tuple(out_channels), x.device)
    with _device_guard(x):
        launch_rows(grad_y, weight, None, offsets, meta, grad_x, transpose=True)
    return grad_x, *weight_grads(grad_y, x, weight, offsets, meta)


def weight_grads(grad_y, x, weight, offsets, meta, src=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad weight [E, Cout_max, Cin_max], grad bias [E, Cout_max]) in weight's dtype from
    contiguous grad y [N, Cout_max, H, W] and x: zeros outside each expert's (out, in) block and
    for experts without rows, the same bits on every run.

    ``src``: as in :func:`launch_rows` (x holds images, row n read ``x[src[n]]``). ``meta``: the
    expert metadata tensor, or None when there are no rows.
    """
    rows, c_out, height, width = grad_y.shape
    num_experts, _, c_in = weight.shape
    pixels = height * width
    _triton_common.check_int32_offsets("grouped_pointwise", "x", x.shape[1] * pixels, tuple(x.shape))
    _triton_common.check_int32_offsets("grouped_pointwise", "grad_y", c_out * pixels, tuple(grad_y.shape))
    grad_weight = _empty(weight.shape, weight.dtype, weight.device)
    grad_bias = _empty((num_experts, c_out), weight.dtype, weight.device)
    if rows * pixels == 0:
        return grad_weight.zero_(), grad_bias.zero_()
    acc_torch, acc_tl = _acc_dtype(x)
    b = _weight_blocks(c_in, c_out, pixels, x.dtype)
    with _device_guard(x):
        # Only the entries inside each row's expert block are written, and only those are read.
        part_w = _empty((rows, b["chunks"], c_out, c_in), acc_torch, x.device)
        part_b = _empty((rows, b["chunks"], c_out), acc_torch, x.device)
        tiles = b["o_blocks"] * b["i_blocks"]
        grouped_pointwise_bwd_weight_kernel[(rows * b["chunks"] * tiles,)](
            x, x if src is None else src, grad_y, offsets, meta, part_w, part_b,
            c_in, c_out, pixels, num_experts, b["o_blocks"], b["i_blocks"], b["chunks"], b["chunk_len"],
            GATHER=src is not None, **_dot_flags(x.dtype), BLOCK_E=triton.next_power_of_2(num_experts),
            BLOCK_O=b["block_o"], BLOCK_I=b["block_i"], BLOCK_P=b["block_p"], ACC=acc_tl,
            num_warps=_num_warps(x.dtype),
        )  # fmt: skip
        grouped_pointwise_bwd_reduce_kernel[(num_experts * tiles,)](
            part_w, part_b, offsets, meta, grad_weight, grad_bias,
            c_in, c_out, num_experts, b["o_blocks"], b["i_blocks"], b["chunks"],
            BLOCK_O=b["block_o"], BLOCK_I=b["block_i"], ACC=acc_tl, num_warps=_REDUCE_NUM_WARPS,
        )  # fmt: skip
    return grad_weight, grad_bias


# --- torch.library registration ----------------------------------------------------------------


def _grouped_pointwise_fwd_fake(x, weight, bias, offsets, in_channels, out_channels):
    return x.new_empty((x.shape[0], weight.shape[1], x.shape[2], x.shape[3]))


def _grouped_pointwise_bwd_fake(grad_y, x, weight, offsets, in_channels, out_channels):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        weight.new_empty((weight.shape[0], weight.shape[1])),
    )


_library.define_triton(
    "grouped_pointwise",
    grouped_pointwise_fwd,
    grouped_pointwise_bwd,
    _grouped_pointwise_fwd_fake,
    _grouped_pointwise_bwd_fake,
    _autograd,
)


def grouped_pointwise_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    in_channels: list[int],
    out_channels: list[int],
) -> torch.Tensor:
    """Every expert's 1x1 convolution in one Triton launch (GPU, or the interpreter).

    Arguments as ``moce_kernels.grouped_pointwise`` (which validates them first): x
    [N, Cin_max, H, W], weight [E, Cout_max, Cin_max], bias [E, Cout_max] or None, offsets [E + 1]
    on x's device (never read on the host), in_channels and out_channels lists of E ints.
    Non-contiguous inputs are copied to contiguous first. Returns [N, Cout_max, H, W] contiguous
    in x's dtype, exact zeros past each expert's output channels; differentiable in x, weight and
    bias.
    """
    return torch.ops.moce_triton.grouped_pointwise_fwd(
        x.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        offsets.contiguous(),
        list(in_channels),
        list(out_channels),
    )
