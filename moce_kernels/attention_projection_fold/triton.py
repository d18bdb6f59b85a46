"""``attention_projection_fold`` in Triton: ``torch.ops.moce_triton.attention_projection_fold_fwd``
/ ``_bwd``.

``attention_projection_fold_kernel``: a program per (image and head, tile of output rows, tile of
the head's D columns) multiplies the projection's [BLOCK_O, D] slice of the head's input
channels by the head's map (loaded with any strides, rounded to the weight's dtype as the
reference's cast does) and stores its tile of W_b: the cast, the einsum's permuted copy, its
batched GEMM and the reshape's copy in one launch. The backward (two small einsums, weight and
map gradients) runs torch's GEMMs: its cost is the forward's, and only the training step pays it.
``custom_op`` rather than ``triton_op``: see ``moce_kernels/layernorm2d/triton.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.attention_projection_fold import _autograd
from moce_kernels.grouped_pointwise.triton import mma

_acc_dtype = _triton_common.acc_dtype
_device_guard = _triton_common.device_guard
_empty = _triton_common.empty
_interpreted = _triton_common.interpreted

#: Output rows per program, the widest tile of the head's D columns, and the contraction's step
#: (ptxas, sm_90, 4 warps, D = 32 / 64: bfloat16 80 / 102 registers on wgmma, float32 112 / 128;
#: 32-wide steps spilled float32's IEEE products).
_BLOCK_O = 64
_BLOCK_E = 64
_BLOCK_K = 16
_NUM_WARPS = 4
#: float64 multiplies broadcast [BLOCK_O, BLOCK_K, BLOCK_E] tiles (grouped_pointwise's mma).
_FP64_BLOCK = 16


@triton.jit
def attention_projection_fold_kernel(
    w_ptr,  # [C_OUT, HEADS * D], contiguous
    attn_ptr,  # [B, HEADS, D, D], any strides
    out_ptr,  # [B, C_OUT, HEADS * D], weight's dtype
    HEADS, D, C_OUT, a_sb, a_sh, a_sd, a_se, O_TILES, E_TILES,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    tiles = O_TILES * E_TILES
    bh = pid // tiles
    tile = pid - bh * tiles
    ot = tile // E_TILES
    et = tile - ot * E_TILES
    b = bh // HEADS
    h = bh - b * HEADS
    c = HEADS * D
    rows = ot * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = et * BLOCK_E + tl.arange(0, BLOCK_E)
    r_ok = rows < C_OUT
    e_ok = cols < D
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_O, BLOCK_E], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        k_ok = k < D
        w = tl.load(
            w_ptr + rows[:, None] * c + (h * D + k)[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0
        )
        a_at = attn_ptr + b * a_sb + h * a_sh + k[:, None] * a_sd + cols[None, :] * a_se
        a = tl.load(a_at, mask=k_ok[:, None] & e_ok[None, :], other=0.0).to(w.dtype)
        acc = mma(acc, w, a, USE_DOT, DOT_UPCAST)
    out = out_ptr + b * C_OUT * c + rows[:, None] * c + (h * D + cols)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & e_ok[None, :])


# --- host launchers ------------------------------------------------------------------------------


def _config(d: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        block = _FP64_BLOCK
        return dict(BLOCK_O=block, BLOCK_K=block, BLOCK_E=block, num_warps=_NUM_WARPS)
    block_e = max(_BLOCK_K, min(_BLOCK_E, triton.next_power_of_2(max(d, 1))))
    return dict(BLOCK_O=_BLOCK_O, BLOCK_K=_BLOCK_K, BLOCK_E=block_e, num_warps=_NUM_WARPS)


def attention_projection_fold_fwd(weight: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """W_b [B, C_out, C] in weight's dtype."""
    c_out, c = weight.shape
    batch, heads, d, _ = attn.shape
    weight = weight.contiguous()
    out = _empty((batch, c_out, c), weight.dtype, weight.device)
    if out.numel() == 0:
        return out
    config = _config(d, weight.dtype)
    o_tiles, e_tiles = triton.cdiv(c_out, config["BLOCK_O"]), triton.cdiv(d, config["BLOCK_E"])
    with _device_guard(weight):
        attention_projection_fold_kernel[(batch * heads * o_tiles * e_tiles,)](
            weight, attn, out, heads, d, c_out, *attn.stride(), o_tiles, e_tiles,
            USE_DOT=weight.dtype != torch.float64,
            DOT_UPCAST=_interpreted() and weight.dtype == torch.bfloat16,
            ACC=_acc_dtype(weight)[1], **config,
        )  # fmt: skip
    return out


def attention_projection_fold_bwd(
    grad_folded: torch.Tensor, weight: torch.Tensor, attn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad weight in weight's dtype, grad attn in attn's dtype): the reference's backward,
    GEMMs in weight's dtype."""
    c_out, c = weight.shape
    batch, heads, d, _ = attn.shape
    g = grad_folded.to(weight.dtype).view(batch, c_out, heads, d)
    grad_weight = torch.einsum("bohe,bhde->ohd", g, attn.to(weight.dtype)).reshape(c_out, c)
    grad_attn = torch.einsum("ohd,bohe->bhde", weight.view(c_out, heads, d), g).to(attn.dtype)
    return grad_weight, grad_attn.contiguous()


# --- torch.library registration ----------------------------------------------------------------


def _fwd_fake(weight: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return weight.new_empty((attn.shape[0], *weight.shape))


def _bwd_fake(
    grad_folded: torch.Tensor, weight: torch.Tensor, attn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return weight.new_empty(weight.shape), attn.new_empty(attn.shape)


_library.define_triton(
    "attention_projection_fold",
    attention_projection_fold_fwd,
    attention_projection_fold_bwd,
    _fwd_fake,
    _bwd_fake,
    _autograd,
)


def attention_projection_fold_triton(weight: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``moce_kernels.attention_projection_fold`` with the Triton kernel (a GPU, or the
    interpreter); arguments validated by the public function."""
    return torch.ops.moce_triton.attention_projection_fold_fwd(weight, attn)
