"""``dwconv_gate_pointwise`` in Triton: ``torch.ops.moce_triton.dwconv_gate_pointwise_fwd`` / ``_bwd``.

Forward: one kernel, ``fused_pointwise``'s GEMM over NCHW (``grouped_pointwise``'s tiles and
``tl.dot``) whose operand is made in registers rather than loaded. A program owns BLOCK_M output
channels x BLOCK_P contiguous pixels of one image; for each chunk of BLOCK_K gate channels it
convolves the chunk's two halves (channels c and c + Ch of x) over its pixels, K x K taps each
(the taps' neighbours are the pixels' flat index +- rows and columns, masked at the image's
edges), forms ``gelu(a) * b`` (exact erf GELU), rounds it to x's dtype as ``dwconv_gelu_gate``
writes it, and feeds it to the product. The epilogue is ``fused_pointwise``'s: bias, rounding to
weight's dtype, residual. Against ``dwconv_gelu_gate`` + ``fused_pointwise`` this removes the
gate's write and read (Ch channels per pixel, twice); x's halo comes from L1/L2. Where C_out
takes several output-channel tiles each tile convolves its pixels again (MoCE-IR-S's C_out is
at most 256: at most two tiles of the GPU's 128).

Backward (training; the forward is what inference runs): the gate is recomputed with
``dwconv_gelu_gate``'s kernel, ``fused_pointwise``'s backward gives the gate's, weight's and
bias's gradients, and ``dwconv_gelu_gate``'s backward x's and the depthwise parameters'. The
gate lives only inside the backward: the unfused layers keep it from forward to backward.
Deterministic: none of them uses atomics.

``custom_op`` rather than ``triton_op``: see ``moce_kernels/_library.py``.
"""

from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.dwconv_gate_pointwise import _autograd
from moce_kernels.fused_pointwise.reference import output_dtype

# By path: the packages' attributes of these names are the functions.
_pw = importlib.import_module("moce_kernels.grouped_pointwise.triton")
_fp = importlib.import_module("moce_kernels.fused_pointwise.triton")
_gate = importlib.import_module("moce_kernels.dwconv_gelu_gate.triton")
_normal_cdf = _gate._normal_cdf_pdf
mma = _pw.mma
store_product = _fp.store_product

#: GPU tiles (ptxas for sm_90, Triton 3.8, 8 warps, no spills; speed unmeasured: needs a GPU).
#: Registers grow with the pixels per thread: the two convolution accumulators ([BLOCK_K,
#: BLOCK_P] each) and a kernel row's taps of both halves are live beside the product's
#: accumulator. At 3 x 3, bf16: [M 64, K 16, P 128] took 240-250 registers, [64, 16, 64] 126-128,
#: [64, 32, 64] 255. One output-channel tile up to 128 channels (the convolution is recomputed
#: per tile): [128, 16, 64] took 192, [128, 16, 32] 124 (167 at 9 x 9).
_GPU_BLOCK_M = 128
_GPU_BLOCK_K = 16
_GPU_BLOCK_P = 64
#: The pixel tile under a BLOCK_M above 64.
_GPU_WIDE_BLOCK_P = 32

_device_guard = _triton_common.device_guard
_empty = _triton_common.empty


@triton.jit
def dwconv_gate_pointwise_kernel(
    x_ptr,  # [B, 2 * CH, H, W] contiguous
    dw_ptr,  # [2 * CH, K, K] in x's dtype
    db_ptr,  # [2 * CH] (unused without DW_BIAS)
    w_ptr,  # [C_OUT, CH]: the product's dtype
    b_ptr,  # [C_OUT] (unused without HAS_BIAS)
    r_ptr,  # [B, C_OUT, H, W] the residual (unused without RESIDUAL)
    y_ptr,  # [B, C_OUT, H, W]
    CH,
    C_OUT,
    H,
    W,
    m_blocks,
    K: tl.constexpr,
    DW_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
):
    # Program = (image, pixel tile, output-channel tile), the channel tile fastest (the other
    # tiles of the same pixels find x in L2). Offsets inside an image in int32, channel offsets
    # (channel * P) in int64 for images of 2**31 or more elements (INT64_OFFSETS: P int64); the
    # image's start int64.
    R: tl.constexpr = K // 2
    if INT64_OFFSETS:
        P = H.to(tl.int64) * W
    else:
        P = H * W
    pid = tl.program_id(0)
    p_tiles = tl.cdiv(P, BLOCK_P)
    m_block = pid % m_blocks
    p_block = (pid // m_blocks) % p_tiles
    image = (pid // (m_blocks * p_tiles)).to(tl.int64)
    ms = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ps = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    ks = tl.arange(0, BLOCK_K)
    m_ok = ms < C_OUT
    p_ok = ps < P
    hs = ps // W
    ws = ps % W
    x_img = x_ptr + image * (2 * CH) * P
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    w_rows = w_ptr + ms * CH
    for k0 in range(0, CH, BLOCK_K):
        cs = k0 + ks
        c_ok = cs < CH
        planes_a = x_img + cs * P
        planes_b = x_img + (CH + cs) * P
        taps_a = dw_ptr + cs * (K * K)
        taps_b = dw_ptr + (CH + cs) * (K * K)
        a = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
        b = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
        # A runtime loop over the kernel rows, the K taps of a row unrolled (as dwconv_gelu_gate:
        # registers and compile time stay flat up to 9 x 9).
        for i in range(K):
            ih = hs + (i - R)
            row_ok = p_ok & (ih >= 0) & (ih < H)
            # One pointer tensor per kernel row and half, its taps at constant offsets from it
            # (as dwconv_gelu_gate's _pair_taps: fewer registers than a pointer tensor per tap).
            row = (ps + (i - R) * W)[None, :]
            row_a = planes_a[:, None] + row
            row_b = planes_b[:, None] + row
            for j in tl.static_range(K):
                iw = ws + (j - R)
                ok = c_ok[:, None] & (row_ok & (iw >= 0) & (iw < W))[None, :]
                xa = tl.load(row_a + (j - R), mask=ok, other=0.0)
                xb = tl.load(row_b + (j - R), mask=ok, other=0.0)
                wa = tl.load(taps_a + (i * K + j), mask=c_ok, other=0.0)
                wb = tl.load(taps_b + (i * K + j), mask=c_ok, other=0.0)
                a += xa.to(ACC) * wa.to(ACC)[:, None]
                b += xb.to(ACC) * wb.to(ACC)[:, None]
        if DW_BIAS:
            a += tl.load(db_ptr + cs, mask=c_ok, other=0.0).to(ACC)[:, None]
            b += tl.load(db_ptr + CH + cs, mask=c_ok, other=0.0).to(ACC)[:, None]
        cdf, _ = _normal_cdf(a)
        # The gate in x's dtype (dwconv_gelu_gate's output tensor); zero past the last channel
        # (there a and b are exact zeros anyway: every load and tap is masked).
        gate = (a * cdf * b).to(x_ptr.dtype.element_ty)
        w = tl.load(w_rows[:, None] + cs[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        acc = mma(acc, w, gate.to(w.dtype), USE_DOT, DOT_UPCAST)
    store_product(
        acc, ms, ps, m_ok, p_ok, image, C_OUT, P, w_ptr, b_ptr, r_ptr, y_ptr, HAS_BIAS, RESIDUAL, ACC
    )


# --- host launchers ------------------------------------------------------------------------------


def _blocks(c_out: int, gate: int, pixels: int, dtype: torch.dtype) -> dict[str, int]:
    """The kernel's tiles: grouped_pointwise's row-kernel tiles under the interpreter and for
    float64 (no tl.dot), else the GPU's (``_GPU_BLOCK_*``)."""
    b = _pw._rows_blocks(c_out, gate, pixels, dtype)
    if _triton_common.interpreted() or dtype == torch.float64:
        return b
    block_m = _pw._block(c_out, _GPU_BLOCK_M, _pw._MIN_DOT)
    block_p = _GPU_BLOCK_P if block_m <= 64 else _GPU_WIDE_BLOCK_P
    return dict(
        block_m=block_m,
        block_k=_GPU_BLOCK_K,
        block_p=block_p,
        m_blocks=triton.cdiv(c_out, block_m),
        p_blocks=triton.cdiv(pixels, block_p),
    )


def dwconv_gate_pointwise_fwd(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """y [B, C_out, H, W] (see ``moce_kernels.dwconv_gate_pointwise``)."""
    _gate._check_layout(x, dw_weight, dw_bias)
    x, dw_weight, weight = x.contiguous(), dw_weight.contiguous(), weight.contiguous()
    batch, channels, height, width = x.shape
    c_out = weight.shape[0]
    y = _empty((batch, c_out, height, width), output_dtype(weight, residual), x.device)
    if y.numel() == 0:
        return y
    pixels = height * width
    # The product's operands: the gate rounded to weight's dtype (float64 accumulates in float64).
    dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else weight.dtype
    b = _blocks(c_out, channels // 2, pixels, dtype)
    dw_bias, bias, residual = (None if t is None else t.contiguous() for t in (dw_bias, bias, residual))
    with _device_guard(x):
        dwconv_gate_pointwise_kernel[(batch * b["p_blocks"] * b["m_blocks"],)](
            x, dw_weight, x if dw_bias is None else dw_bias, weight, x if bias is None else bias,
            x if residual is None else residual, y,
            channels // 2, c_out, height, width, b["m_blocks"],
            K=dw_weight.shape[-1], DW_BIAS=dw_bias is not None, HAS_BIAS=bias is not None,
            RESIDUAL=residual is not None, **_pw._dot_flags(dtype),
            BLOCK_M=b["block_m"], BLOCK_K=b["block_k"], BLOCK_P=b["block_p"],
            ACC=_triton_common.acc_dtype(x, weight)[1],
            INT64_OFFSETS=_triton_common.int64_offsets(channels * pixels, c_out * pixels),
            num_warps=_pw._num_warps(dtype),
        )  # fmt: skip
    return y


def dwconv_gate_pointwise_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x in x's dtype, grad dw_weight, grad dw_bias in dw_weight's dtype (zeros without
    dw_bias), grad weight, grad bias in weight's dtype). The residual's gradient is grad_y itself
    (the autograd formula passes it on)."""
    gate = _gate.dwconv_gelu_gate_fwd(x, dw_weight, dw_bias)
    grad_gate, grad_weight, grad_bias, _, _ = _fp.fused_pointwise_bwd(grad_y, gate, weight, None, None, 1.0)
    grad_x, grad_dw_weight, grad_dw_bias = _gate.dwconv_gelu_gate_bwd(grad_gate, x, dw_weight, dw_bias)
    return grad_x, grad_dw_weight, grad_dw_bias, grad_weight, grad_bias


# --- torch.library registration ----------------------------------------------------------------


def _dwconv_gate_pointwise_fwd_fake(x, dw_weight, dw_bias, weight, bias, residual):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return x.new_empty(shape, dtype=output_dtype(weight, residual))


def _dwconv_gate_pointwise_bwd_fake(grad_y, x, dw_weight, dw_bias, weight):
    return (
        x.new_empty(x.shape),
        dw_weight.new_empty(dw_weight.shape),
        dw_weight.new_empty((dw_weight.shape[0],)),
        weight.new_empty(weight.shape),
        weight.new_empty((weight.shape[0],)),
    )


_library.define_triton(
    "dwconv_gate_pointwise",
    dwconv_gate_pointwise_fwd,
    dwconv_gate_pointwise_bwd,
    _dwconv_gate_pointwise_fwd_fake,
    _dwconv_gate_pointwise_bwd_fake,
    _autograd,
)


def dwconv_gate_pointwise_triton(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """The GDFN's depthwise convolution, gate, 1x1 convolution and residual add in one Triton
    kernel (GPU, or the interpreter). Arguments as ``moce_kernels.dwconv_gate_pointwise`` (which
    validates them first); non-contiguous inputs are copied to contiguous first. Differentiable
    in every tensor."""
    return torch.ops.moce_triton.dwconv_gate_pointwise_fwd(
        *(None if t is None else t.contiguous() for t in (x, dw_weight, dw_bias, weight, bias, residual))
    )
