"""``fused_pointwise`` in Triton: ``torch.ops.moce_triton.fused_pointwise_fwd`` / ``_bwd``.

Forward: one kernel, ``grouped_pointwise``'s GEMM over NCHW with a prologue and an epilogue. A
program owns BLOCK_M output channels x BLOCK_P contiguous pixels of one image. With the norm, it
first sweeps the image's input channels over its pixels in BLOCK_K chunks for the statistics
(Chan's combination of the chunks' means and centred sums of squares of x minus its channel-0
value, as ``layernorm2d``'s chunked kernel: no E[x^2] - E[x]^2 cancellation), then sweeps them
again normalising each chunk in registers before its ``tl.dot``. x comes from DRAM once: the
second sweep, and the other output-channel tiles of the same pixels (neighbouring programs),
find it in L2. The epilogue adds the bias, rounds the product to weight's dtype and adds the
residual. Each of those roundings is the unfused layers' (see ``reference.py``), so the result
differs from theirs by the order of float32 sums only. A per-image weight ([B, C_out, C_in])
only moves the program's weight pointer to its image's; x's images may lie any distance apart
(``x_batch_stride``: a channel chunk of a wider tensor is read in place).

Backward (rarely the hot path: the forward is what inference runs): the normalised x is
recomputed with ``layernorm2d``'s kernel (x is kept for it anyway, it is the block's residual
stream, where the unfused layers keep a second tensor), then ``grouped_pointwise``'s kernels give
the operand's, weight's and bias's gradients (one group, or one per image for per-image
weights), and ``layernorm2d``'s backward the
input's and the norm's. Deterministic: none of them uses atomics.

``custom_op`` rather than ``triton_op``: see ``moce_kernels/layernorm2d/triton.py``.
"""

from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.fused_pointwise import _autograd
from moce_kernels.fused_pointwise.reference import output_dtype

# The GEMM's tiles, dot flags and kernels are grouped_pointwise's (imported by path: the
# package attribute is the function).
_pw = importlib.import_module("moce_kernels.grouped_pointwise.triton")
_ln = importlib.import_module("moce_kernels.layernorm2d.triton")
mma = _pw.mma

#: float32 products run on FMA (IEEE, no TF32): with the statistics' vectors live, the GEMM's
#: [64, 128] tile over 32-channel steps takes 255 registers and spills 400 bytes on sm_90 (ptxas,
#: 8 warps, Triton 3.8), [64, 64] still spills 16 with Triton 3.6; [64, 64] over 16-channel steps
#: takes 128-151 and spills nothing with either. The bfloat16 / float16 tiles (wgmma) take 140-175.
_FP32_BLOCK_P = 64
_FP32_BLOCK_K = 16

_acc_dtype = _triton_common.acc_dtype
_device_guard = _triton_common.device_guard
_empty = _triton_common.empty


@triton.jit
def store_product(
    acc, ms, ps, m_ok, p_ok, image, C_OUT, P, w_ptr, b_ptr, r_ptr, y_ptr,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The epilogue of the trunk's 1x1 GEMMs: y[image, ms, ps] = round(acc + bias to weight's
    dtype) + residual, the unfused layers' roundings (see ``reference.py``)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + ms, mask=m_ok, other=0.0).to(ACC)[:, None]
    out = (ms * P)[:, None] + ps[None, :]
    ok = m_ok[:, None] & p_ok[None, :]
    y = acc.to(w_ptr.dtype.element_ty)  # the convolution's output tensor
    if RESIDUAL:
        r = tl.load(r_ptr + image * C_OUT * P + out, mask=ok, other=0.0)
        y = y.to(ACC) + r.to(ACC)
    tl.store(y_ptr + image * C_OUT * P + out, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def fused_pointwise_kernel(
    x_ptr,  # [B, C_IN, P]: each image's block contiguous, x_batch_stride apart
    w_ptr,  # [C_OUT, C_IN], or [B, C_OUT, C_IN] (w_batch_stride != 0): the product's dtype
    b_ptr,  # [C_OUT] (unused without HAS_BIAS)
    g_ptr,  # [C_IN] the norm's weight (unused without NORM)
    nb_ptr,  # [C_IN] the norm's bias (unused without NORM)
    r_ptr,  # [B, C_OUT, P] the residual (unused without RESIDUAL)
    y_ptr,  # [B, C_OUT, P]
    C_IN,
    C_OUT,
    P,
    m_blocks,
    x_batch_stride,
    w_batch_stride,
    eps,
    NORM: tl.constexpr,
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
    # Program = (image, pixel tile, output-channel tile), the channel tile fastest: neighbouring
    # programs read the same x tile, from L2 after the first. int32 offsets inside an image,
    # channel offsets (channel * P) in int64 for images of 2**31 or more elements
    # (INT64_OFFSETS), the image's start int64.
    if INT64_OFFSETS:
        P = P.to(tl.int64)
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
    x_img = x_ptr + image * x_batch_stride
    if NORM:
        shift = tl.load(x_img + ps, mask=p_ok, other=0.0).to(ACC)
        count = tl.zeros([BLOCK_P], dtype=ACC)
        mean_s = tl.zeros([BLOCK_P], dtype=ACC)
        m2 = tl.zeros([BLOCK_P], dtype=ACC)
        for k0 in range(0, C_IN, BLOCK_K):
            ok = ((k0 + ks) < C_IN)[:, None] & p_ok[None, :]
            xv = tl.load(x_img + ((k0 + ks) * P)[:, None] + ps[None, :], mask=ok, other=0.0)
            xs = tl.where(ok, xv.to(ACC) - shift[None, :], 0.0)
            n_chunk = tl.minimum(C_IN - k0, BLOCK_K).to(ACC)
            chunk_mean = tl.sum(xs, 0) / n_chunk
            xc = tl.where(ok, xs - chunk_mean[None, :], 0.0)
            total = count + n_chunk
            delta = chunk_mean - mean_s
            mean_s = mean_s + delta * (n_chunk / total)
            m2 = m2 + tl.sum(xc * xc, 0) + delta * delta * (count * n_chunk / total)
            count = total
        rstd = 1.0 / tl.sqrt(m2 / C_IN + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    w_rows = w_ptr + image * w_batch_stride + ms * C_IN
    for k0 in range(0, C_IN, BLOCK_K):
        k_ok = (k0 + ks) < C_IN
        ok = k_ok[:, None] & p_ok[None, :]
        a = tl.load(x_img + ((k0 + ks) * P)[:, None] + ps[None, :], mask=ok, other=0.0)
        if NORM:
            g = tl.load(g_ptr + k0 + ks, mask=k_ok, other=0.0).to(ACC)
            nb = tl.load(nb_ptr + k0 + ks, mask=k_ok, other=0.0).to(ACC)
            xn = ((a.to(ACC) - shift[None, :]) - mean_s[None, :]) * rstd[None, :] * g[:, None] + nb[:, None]
            # The LayerNorm's result in x's dtype (its output tensor), zero where masked.
            a = tl.where(ok, xn, 0.0).to(x_ptr.dtype.element_ty)
        w = tl.load(w_rows[:, None] + (k0 + ks)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = mma(acc, w, a.to(w.dtype), USE_DOT, DOT_UPCAST)
    store_product(
        acc, ms, ps, m_ok, p_ok, image, C_OUT, P, w_ptr, b_ptr, r_ptr, y_ptr, HAS_BIAS, RESIDUAL, ACC
    )


# --- host launchers ------------------------------------------------------------------------------


def _blocks(c_out: int, c_in: int, pixels: int, dtype: torch.dtype) -> dict[str, int]:
    """The kernel's tiles: grouped_pointwise's row-kernel tiles for the product's dtype, narrower
    for float32 on a GPU (see ``_FP32_BLOCK_P``)."""
    b = _pw._rows_blocks(c_out, c_in, pixels, dtype)
    if dtype == torch.float32 and not _triton_common.interpreted():
        block_p, block_k = min(b["block_p"], _FP32_BLOCK_P), min(b["block_k"], _FP32_BLOCK_K)
        b = dict(b, block_p=block_p, block_k=block_k, p_blocks=triton.cdiv(pixels, block_p))
    return b


def _image_blocks(x: torch.Tensor) -> torch.Tensor:
    """x itself when each image's [C, H, W] block is contiguous (a channel chunk of a wider
    tensor, such as attention's v inside the qkv tensor: read in place), else a contiguous copy."""
    if x.is_contiguous() or (x.shape[0] > 0 and x[0].is_contiguous() and x.stride(0) >= x[0].numel()):
        return x
    return x.contiguous()


def fused_pointwise_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """y [B, C_out, H, W] (see ``moce_kernels.fused_pointwise``)."""
    x, weight = _image_blocks(x), weight.contiguous()
    batch, c_in, height, width = x.shape
    c_out = weight.shape[-2]
    y = _empty((batch, c_out, height, width), output_dtype(weight, residual), x.device)
    if y.numel() == 0:
        return y
    pixels = height * width
    # The product's operands: x rounded to weight's dtype (float64 accumulates in float64).
    dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else weight.dtype
    b = _blocks(c_out, c_in, pixels, dtype)
    norm = norm_weight is not None
    contiguous = [None if t is None else t.contiguous() for t in (bias, norm_weight, norm_bias, residual)]
    bias, norm_weight, norm_bias, residual = contiguous
    with _device_guard(x):
        fused_pointwise_kernel[(batch * b["p_blocks"] * b["m_blocks"],)](
            x, weight, x if bias is None else bias, x if not norm else norm_weight,
            x if not norm else norm_bias, x if residual is None else residual, y,
            c_in, c_out, pixels, b["m_blocks"], x.stride(0), c_out * c_in if weight.dim() == 3 else 0,
            float(eps),
            NORM=norm, HAS_BIAS=bias is not None, RESIDUAL=residual is not None, **_pw._dot_flags(dtype),
            BLOCK_M=b["block_m"], BLOCK_K=b["block_k"], BLOCK_P=b["block_p"],
            ACC=_acc_dtype(x, weight)[1],
            INT64_OFFSETS=_triton_common.int64_offsets(c_in * pixels, c_out * pixels),
            num_warps=_pw._num_warps(dtype),
        )  # fmt: skip
    return y


def fused_pointwise_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad weight, grad bias in weight's dtype, grad norm_weight, grad norm_bias in
    norm_weight's dtype; the last two empty without the norm). The residual's gradient is
    grad_y itself (the autograd formula passes it on)."""
    x, weight = x.contiguous(), weight.contiguous()
    batch, c_in, height, width = x.shape
    c_out = weight.shape[-2]
    norm = norm_weight is not None
    # The gradient reaching the product: the rounding to its dtype is a cast in the unfused graph.
    grad_p = grad_y.to(weight.dtype).contiguous()
    # grouped_pointwise's kernels over groups of images: one group for a shared weight, one per
    # image for per-image weights.
    weights = weight if weight.dim() == 3 else weight.view(1, c_out, c_in)
    groups = weights.shape[0]
    with _device_guard(x):
        if norm:
            normed, mean, rstd = _ln.layernorm2d_fwd(x, norm_weight, norm_bias, eps)
            operand = normed.to(weight.dtype)
        else:
            operand = x.to(weight.dtype)
        offsets = torch.arange(groups + 1, device=x.device) * (batch if groups == 1 else 1)
        widths = ((c_in,) * groups, (c_out,) * groups)
        meta = _triton_common.expert_metadata(*widths, x.device) if x.numel() else None
        grad_operand = _empty(operand.shape, weight.dtype, x.device)
        if grad_operand.numel():
            _pw.launch_rows(grad_p, weights, None, offsets, meta, grad_operand, transpose=True)
        grad_weight, grad_bias = _pw.weight_grads(grad_p, operand, weights, offsets, meta)
        if norm:
            grad_x, grad_norm_weight, grad_norm_bias = _ln.layernorm2d_bwd(
                grad_operand.to(x.dtype), x, norm_weight, mean, rstd
            )
        else:
            grad_x = grad_operand.to(x.dtype)
            grad_norm_weight, grad_norm_bias = x.new_empty(0), x.new_empty(0)
    # A bias shared by every image: the per-image sums added in a fixed order.
    grad_bias = grad_bias.view(c_out) if groups == 1 else grad_bias.sum(0)
    return grad_x, grad_weight.view(weight.shape), grad_bias, grad_norm_weight, grad_norm_bias


# --- torch.library registration ----------------------------------------------------------------


def _fused_pointwise_fwd_fake(x, weight, bias, norm_weight, norm_bias, eps, residual):
    shape = (x.shape[0], weight.shape[-2], x.shape[2], x.shape[3])
    return x.new_empty(shape, dtype=output_dtype(weight, residual))


def _fused_pointwise_bwd_fake(grad_y, x, weight, norm_weight, norm_bias, eps):
    c_out = weight.shape[-2]
    norm_grads = (
        (norm_weight.new_empty(norm_weight.shape), norm_weight.new_empty(norm_weight.shape))
        if norm_weight is not None
        else (x.new_empty(0), x.new_empty(0))
    )
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((c_out,)), *norm_grads


_library.define_triton(
    "fused_pointwise",
    fused_pointwise_fwd,
    fused_pointwise_bwd,
    _fused_pointwise_fwd_fake,
    _fused_pointwise_bwd_fake,
    _autograd,
)


def fused_pointwise_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """The LayerNorm, 1x1 convolution and residual add in one Triton kernel (GPU, or the
    interpreter). Arguments as ``moce_kernels.fused_pointwise`` (which validates them first);
    x is read in place when each image's block is contiguous, other non-contiguous inputs are
    copied to contiguous first. Differentiable in every tensor."""
    return torch.ops.moce_triton.fused_pointwise_fwd(
        _image_blocks(x),
        weight.contiguous(),
        *(None if t is None else t.contiguous() for t in (bias, norm_weight, norm_bias)),
        float(eps),
        None if residual is None else residual.contiguous(),
    )
