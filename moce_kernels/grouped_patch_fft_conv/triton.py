"""``grouped_patch_fft_conv`` in Triton: ``torch.ops.moce_triton.grouped_patch_fft_conv_fwd`` / ``_bwd``.

Each row at its own expert's patch size, in one launch, no host read, and no FFT of any other
size: the patch-wise circular convolution ``irfft2(rfft2(q) * rfft2(k))`` is computed as dense
DFTs, ``DFT2(X) = F X F`` with ``F = C - iS`` (``C[a, b] = cos(2 pi ab / p)``, ``S`` the sine),
so every transform is a few [32, 32] matrix products (``tl.dot``: TF32 tensor cores for 16-bit
inputs, IEEE float32 for the others; see ``_PRECISION``).

A program owns one 32 x 32 tile of one row (tiles start at multiples of 32, so they hold whole
p x p patches for every p dividing 32) and loops over a block of channels. It finds its row's
expert on the device (``e = #{experts whose rows end at or before n}``, as the other grouped
ops), and loads that expert's [32, 32] DFT matrices: for p < 32 they are block-diagonal,
``kron(I_{32/p}, C_p)``, which transforms each patch of the tile on its own. Per channel:
``T1 = C X, T2 = S X; Re = T1 C - T2 S; Im = -(T1 S + T2 C)`` for q and k (8 products), the
complex product, and the inverse ``((C Pr - S Pi) C - (S Pr + C Pi) S) / p^2`` (6 products).
Pixels past H, W load as zeros: the reference's zero padding to multiples of p. Channels past the
row's expert width are ignored and give exact zeros, as in the reference.

Backward: ``grad_q = IDFT(DFT(g) conj(DFT(k)))`` and ``grad_k = IDFT(DFT(g) conj(DFT(q)))`` (the
circular correlations with the other input), the same way, in one kernel; each pixel written
once, no atomics, so the same bits on every run.

Patch sizes: the divisors of 32 (1, 2, 4, 8, 16, 32; the experts use 4 to 32). Accumulation in
float32 whatever the input dtype (the reference computes its FFTs in float32 too; float64 inputs
are transformed in float32 as well); the products' precision follows the inputs (``_PRECISION``).
Dense DFTs cost 14 [32, 32] products per channel and tile (~460 multiply-adds per pixel) where an
FFT needs far fewer, but they read q and k once and write the result once, where the reference
moves each row through a dozen full-size float32 passes per distinct patch size. ``custom_op``
rather than ``triton_op``: see ``moce_kernels/layernorm2d/triton.py``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.grouped_patch_fft_conv import _autograd
from moce_kernels.patch_fft_conv import TRITON_PATCH_SIZES, TRITON_TENSOR_CORE_DTYPES

_device_guard = _triton_common.device_guard
_empty = _triton_common.empty
_metadata = _triton_common.expert_metadata
_expert_of_row = _triton_common.expert_of_row

#: The tile side: every supported patch size divides it.
TILE = 32
SUPPORTED_PATCH_SIZES = TRITON_PATCH_SIZES
assert all(TILE % p == 0 for p in SUPPORTED_PATCH_SIZES)
#: Channels per program of the forward / backward (looped, sharing the DFT matrices it loaded).
#: ptxas on sm_90 (8 warps, TF32 products, bf16): the forward 230 registers with 4 channels; the
#: backward 255 with 1, no spill with Triton 3.8 and one 8-byte slot with Triton 3.6.
_FWD_CHANNELS = 4
_BWD_CHANNELS = 1
_NUM_WARPS = 8
#: The products' precision per input dtype. 16-bit inputs: TF32 tensor cores (the DFT matrices
#: and intermediate products rounded to 10-bit mantissas: ~1e-3 of the output's scale, under the
#: inputs' own bf16 rounding); float32 / float64: IEEE float32 products on the CUDA cores, which
#: spill on sm_90 (correct, and for that reason not what "auto" picks).
_PRECISION = dict.fromkeys(TRITON_TENSOR_CORE_DTYPES, "tf32")


@triton.jit
def _dot(a, b, P: tl.constexpr):
    return tl.dot(a, b, input_precision=P)


@triton.jit
def _dot_acc(a, b, acc, P: tl.constexpr):
    """``acc + a b``, accumulated in the product's registers (one tile fewer live than a sum)."""
    return tl.dot(a, b, acc=acc, input_precision=P)


@triton.jit
def _dft(x, cm, sm, P: tl.constexpr):
    """(Re, Im) of ``F x F`` for F = C - iS (each p x p block of x on its own):
    ``Re = T1 C - T2 S``, ``Im = -T1 S - T2 C`` with ``T1 = C x``, ``T2 = S x``."""
    t1 = _dot(cm, x, P)
    if P == "ieee":
        # CUDA-core products: separate products and sums spill less than accumulating chains.
        t2 = _dot(sm, x, P)
        return _dot(t1, cm, P) - _dot(t2, sm, P), -(_dot(t1, sm, P) + _dot(t2, cm, P))
    t2n = -_dot(sm, x, P)  # -T2: the sums below then accumulate in the mma, no subtraction
    return _dot_acc(t2n, sm, _dot(t1, cm, P), P), _dot_acc(t2n, cm, -_dot(t1, sm, P), P)


@triton.jit
def _idft_real(pr, pi, cm, sm, scale, P: tl.constexpr):
    """Re of ``conj(F) (pr + i pi) conj(F)``, times ``scale`` (1 / p^2):
    ``(a C - b S) scale`` with ``a = C pr - S pi``, ``b = S pr + C pi``."""
    if P == "ieee":
        a = _dot(cm, pr, P) - _dot(sm, pi, P)
        b = _dot(sm, pr, P) + _dot(cm, pi, P)
        return (_dot(a, cm, P) - _dot(b, sm, P)) * scale
    a = _dot_acc(cm, pr, -_dot(sm, pi, P), P)
    b = _dot_acc(cm, pi, _dot(sm, pr, P), P)
    return _dot_acc(a, cm, -_dot(b, sm, P), P) * scale


@triton.jit
def _tile_of(rows, cols, H, W):
    """Offsets of a tile's pixels inside a plane, and the mask of those inside it."""
    return rows[:, None] * W + cols[None, :], (rows < H)[:, None] & (cols < W)[None, :]


@triton.jit
def grouped_patch_fft_conv_fwd_kernel(
    q_ptr, k_ptr,  # [N, C_MAX, H, W]
    dft_ptr,  # [E, 2, TILE, TILE] float32: each expert's C then S (block-diagonal for p < TILE)
    off_ptr,  # [E + 1] row offsets
    meta_ptr,  # [2 * E] int32: channels, then patch sizes
    out_ptr,  # [N, C_MAX, H, W] float32
    C_MAX, H, W, E, tiles_w, tiles, c_blocks,
    BLOCK_E: tl.constexpr, CPP: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    c_block = (pid // tiles) % c_blocks
    row = pid // (tiles * c_blocks)
    e, c_e, p_e = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
    idx = tl.arange(0, TILE)
    rows = (tile // tiles_w) * TILE + idx
    cols = (tile % tiles_w) * TILE + idx
    offs, mask = _tile_of(rows, cols, H, W)
    mat = idx[:, None] * TILE + idx[None, :]
    cm = tl.load(dft_ptr + e * 2 * TILE * TILE + mat)
    sm = tl.load(dft_ptr + e * 2 * TILE * TILE + TILE * TILE + mat)
    scale = 1.0 / (p_e * p_e).to(tl.float32)
    for i in range(0, CPP):
        c = c_block * CPP + i
        if c < C_MAX:
            plane = (row * C_MAX + c) * H * W
            if c < c_e:
                x = tl.load(q_ptr + plane + offs, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(k_ptr + plane + offs, mask=mask, other=0.0).to(tl.float32)
                xr, xi = _dft(x, cm, sm, PRECISION)
                yr, yi = _dft(y, cm, sm, PRECISION)
                out = _idft_real(xr * yr - xi * yi, xr * yi + xi * yr, cm, sm, scale, PRECISION)
            else:
                out = tl.zeros([TILE, TILE], dtype=tl.float32)
            tl.store(out_ptr + plane + offs, out, mask=mask)


# The backward repeats the forward's prologue on purpose: the same lines moved into a shared
# @triton.jit helper made ptxas spill 16 bytes in the backward (sm_90, Triton 3.8).
@triton.jit
def grouped_patch_fft_conv_bwd_kernel(
    g_ptr,  # [N, C_MAX, H, W] float32 gradient of the output
    q_ptr, k_ptr,  # [N, C_MAX, H, W]
    dft_ptr, off_ptr, meta_ptr,
    gq_ptr, gk_ptr,  # [N, C_MAX, H, W] in q's / k's dtype
    C_MAX, H, W, E, tiles_w, tiles, c_blocks,
    BLOCK_E: tl.constexpr, CPP: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    c_block = (pid // tiles) % c_blocks
    row = pid // (tiles * c_blocks)
    e, c_e, p_e = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
    idx = tl.arange(0, TILE)
    rows = (tile // tiles_w) * TILE + idx
    cols = (tile % tiles_w) * TILE + idx
    offs, mask = _tile_of(rows, cols, H, W)
    mat = idx[:, None] * TILE + idx[None, :]
    cm = tl.load(dft_ptr + e * 2 * TILE * TILE + mat)
    sm = tl.load(dft_ptr + e * 2 * TILE * TILE + TILE * TILE + mat)
    scale = 1.0 / (p_e * p_e).to(tl.float32)
    for i in range(0, CPP):
        c = c_block * CPP + i
        if c < C_MAX:
            plane = (row * C_MAX + c) * H * W
            if c < c_e:
                # G conj(K) and G conj(Q): the correlations of g with k and with q. The order
                # is chosen per kind of product, for the fewest spills on sm_90.
                g = tl.load(g_ptr + plane + offs, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(k_ptr + plane + offs, mask=mask, other=0.0).to(tl.float32)
                gr, gi = _dft(g, cm, sm, PRECISION)
                if PRECISION == "ieee":
                    # CUDA-core products: all three spectra first, both results stored last.
                    x = tl.load(q_ptr + plane + offs, mask=mask, other=0.0).to(tl.float32)
                    xr, xi = _dft(x, cm, sm, PRECISION)
                    yr, yi = _dft(y, cm, sm, PRECISION)
                    grad_q = _idft_real(gr * yr + gi * yi, gi * yr - gr * yi, cm, sm, scale, PRECISION)
                    grad_k = _idft_real(gr * xr + gi * xi, gi * xr - gr * xi, cm, sm, scale, PRECISION)
                    tl.store(gq_ptr + plane + offs, grad_q.to(gq_ptr.dtype.element_ty), mask=mask)
                else:
                    # Tensor cores: grad_q stored before q's spectrum is made, so that four
                    # spectra are live at once, not six (which spilled 32 bytes with Triton 3.6).
                    yr, yi = _dft(y, cm, sm, PRECISION)
                    grad_q = _idft_real(gr * yr + gi * yi, gi * yr - gr * yi, cm, sm, scale, PRECISION)
                    tl.store(gq_ptr + plane + offs, grad_q.to(gq_ptr.dtype.element_ty), mask=mask)
                    x = tl.load(q_ptr + plane + offs, mask=mask, other=0.0).to(tl.float32)
                    xr, xi = _dft(x, cm, sm, PRECISION)
                    grad_k = _idft_real(gr * xr + gi * xi, gi * xr - gr * xi, cm, sm, scale, PRECISION)
                tl.store(gk_ptr + plane + offs, grad_k.to(gk_ptr.dtype.element_ty), mask=mask)
            else:
                zeros = tl.zeros([TILE, TILE], dtype=tl.float32)
                tl.store(gq_ptr + plane + offs, zeros.to(gq_ptr.dtype.element_ty), mask=mask)
                tl.store(gk_ptr + plane + offs, zeros.to(gk_ptr.dtype.element_ty), mask=mask)


# --- host launchers ------------------------------------------------------------------------------


def _dft_block(p: int) -> tuple[list[list[float]], list[list[float]]]:
    """C and S of size TILE: ``kron(I_{TILE/p}, C_p)`` and the same for the sine, in float64."""
    c = [[0.0] * TILE for _ in range(TILE)]
    s = [[0.0] * TILE for _ in range(TILE)]
    for a in range(TILE):
        for b in range(TILE):
            if a // p == b // p:
                angle = 2.0 * math.pi * ((a % p) * (b % p) % p) / p
                c[a][b], s[a][b] = math.cos(angle), math.sin(angle)
    return c, s


@functools.lru_cache(maxsize=64)
def dft_matrices(patch_sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[E, 2, TILE, TILE] float32 on ``device``: each expert's block-diagonal C and S.

    Cached: the copy to the device happens at a configuration's first call only (run one before
    capturing a CUDA graph)."""
    return torch.tensor([_dft_block(p) for p in patch_sizes], dtype=torch.float64).float().to(device)


def check_patch_sizes(patch_sizes) -> None:
    bad = [p for p in patch_sizes if p not in SUPPORTED_PATCH_SIZES]
    if bad:
        raise ValueError(
            f"grouped_patch_fft_conv (Triton): patch sizes must divide {TILE} "
            f"({', '.join(map(str, SUPPORTED_PATCH_SIZES))}), got {bad}"
        )


def _launch(q: torch.Tensor, channels_per_program: int) -> tuple[tuple[int], dict]:
    """(grid, the launch's shape arguments and constants) for rows like ``q``."""
    _, C_max, H, W = q.shape
    tiles_w = triton.cdiv(W, TILE)
    tiles = triton.cdiv(H, TILE) * tiles_w
    c_blocks = triton.cdiv(C_max, channels_per_program)
    args = dict(
        C_MAX=C_max, H=H, W=W, tiles_w=tiles_w, tiles=tiles, c_blocks=c_blocks, CPP=channels_per_program,
        TILE=TILE, PRECISION=_PRECISION.get(q.dtype, "ieee"), num_warps=_NUM_WARPS,
    )  # fmt: skip
    return (q.shape[0] * c_blocks * tiles,), args


def grouped_patch_fft_conv_fwd(
    q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, channels: list[int], patch_sizes: list[int]
) -> torch.Tensor:
    """[N, C_max, H, W] float32 (see ``moce_kernels.grouped_patch_fft_conv``)."""
    check_patch_sizes(patch_sizes)
    q, k, offsets = q.contiguous(), k.contiguous(), offsets.contiguous()
    out = _empty(q.shape, torch.float32, q.device)
    if out.numel() == 0:
        return out
    grid, args = _launch(q, _FWD_CHANNELS)
    num_experts = len(channels)
    with _device_guard(q):
        grouped_patch_fft_conv_fwd_kernel[grid](
            q, k, dft_matrices(tuple(patch_sizes), q.device), offsets,
            _metadata(tuple(channels), tuple(patch_sizes), q.device), out, E=num_experts,
            BLOCK_E=triton.next_power_of_2(num_experts), **args,
        )  # fmt: skip
    return out


def grouped_patch_fft_conv_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    offsets: torch.Tensor,
    channels: list[int],
    patch_sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad q, grad k) in q's and k's dtypes; zeros past each row's expert width."""
    q, k, offsets = q.contiguous(), k.contiguous(), offsets.contiguous()
    grad_out = grad_out.to(torch.float32).contiguous()
    grad_q = _empty(q.shape, q.dtype, q.device)
    grad_k = _empty(k.shape, k.dtype, k.device)
    if q.numel() == 0:
        return grad_q, grad_k
    grid, args = _launch(q, _BWD_CHANNELS)
    num_experts = len(channels)
    with _device_guard(q):
        grouped_patch_fft_conv_bwd_kernel[grid](
            grad_out, q, k, dft_matrices(tuple(patch_sizes), q.device), offsets,
            _metadata(tuple(channels), tuple(patch_sizes), q.device), grad_q, grad_k, E=num_experts,
            BLOCK_E=triton.next_power_of_2(num_experts), **args,
        )  # fmt: skip
    return grad_q, grad_k


# --- torch.library registration ----------------------------------------------------------------


def _fwd_fake(q, k, offsets, channels, patch_sizes):
    return q.new_empty(q.shape, dtype=torch.float32)


def _bwd_fake(grad_out, q, k, offsets, channels, patch_sizes):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _fwd(
    q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, channels: list[int], patch_sizes: list[int]
) -> torch.Tensor:
    return grouped_patch_fft_conv_fwd(q, k, offsets, channels, patch_sizes)


def _bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    offsets: torch.Tensor,
    channels: list[int],
    patch_sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return grouped_patch_fft_conv_bwd(grad_out, q, k, offsets, channels, patch_sizes)


_library.define_triton("grouped_patch_fft_conv", _fwd, _bwd, _fwd_fake, _bwd_fake, _autograd)


def grouped_patch_fft_conv_triton(
    q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, channels: list[int], patch_sizes: list[int]
) -> torch.Tensor:
    """``moce_kernels.grouped_patch_fft_conv`` with the Triton kernels (a GPU, or the interpreter);
    arguments validated by the public function; patch sizes dividing 32 (checked by the op)."""
    return torch.ops.moce_triton.grouped_patch_fft_conv_fwd(q, k, offsets, list(channels), list(patch_sizes))
