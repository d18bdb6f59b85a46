"""``pointwise_combine`` in Triton: ``torch.ops.moce_triton.pointwise_combine_fwd`` / ``_bwd``.

A program owns a tile of BLOCK_M output channels and BLOCK_P pixels of one *image*. For each of
the image's k slots it finds the slot's row (``inverse``) and that row's expert on the device,
runs the expert's [Cout_e, Cin_e] x [Cin_e, BLOCK_P] product (``grouped_pointwise``'s
``expert_tile_product``: tl.dot over BLOCK_K input channels, masked past the expert's widths;
skipped for a tile past ``out_channels[e]``), adds the bias, rounds to h's dtype (as the
unfused op returns the row) and adds it, gate-weighted, to a float32 accumulator; then the
residual times the sum of the gates.
The result is stored once, in image order: the scatter is fused into the store, so neither the
rows nor the combined copy are written, and no atomics are needed (each output element has one
writer; the k terms are added in slot order: deterministic).

Backward, from the existing kernels: when the gates need a gradient the rows' products are
recomputed (``grouped_pointwise``'s row kernel; one GEMM, instead of keeping B * k rows alive
from the forward), ``combine``'s backward kernels give each row's gradient (gate * grad_out of
its image) and the gates' dot products, ``grouped_pointwise``'s backward gives h, weight and
bias; the residual's terms (``sum_j gates * grad_out``, ``<grad_out, residual>``) are two torch
reductions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moce_kernels import _library, _triton_common
from moce_kernels.combine.triton import combine_bwd
from moce_kernels.grouped_pointwise import triton as pointwise
from moce_kernels.grouped_pointwise.triton import expert_tile_product
from moce_kernels.pointwise_combine import _autograd
from moce_kernels.route.reference import RoutingPlan

_expert_of_row = _triton_common.expert_of_row


@triton.jit
def pointwise_combine_kernel(
    h_ptr,  # [S, C_IN, P] rows in expert order
    w_ptr,  # [E, C_OUT, C_IN]
    b_ptr,  # [E, C_OUT] (unused without HAS_BIAS)
    off_ptr,  # [E + 1] row offsets
    meta_ptr,  # [2 * E] int32: input widths, then output widths
    inv_ptr,  # [S] integer: the row of slot b * K + j
    gates_ptr,  # [B * K] float
    res_ptr,  # [B, C_OUT, P] (unused without HAS_RESIDUAL)
    out_ptr,  # [B, C_OUT, P]
    C_IN,
    C_OUT,
    P,
    E,
    K,
    m_blocks,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    # Program = (image, pixel tile, channel tile), the channel tile fastest (as the row kernel).
    pid = tl.program_id(0)
    p_tiles = tl.cdiv(P, BLOCK_P)
    m_block = pid % m_blocks
    p_block = (pid // m_blocks) % p_tiles
    image = (pid // (m_blocks * p_tiles)).to(tl.int64)
    ms = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ps = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < P
    total = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    for j in range(0, K):
        slot = image * K + j
        row = tl.load(inv_ptr + slot).to(tl.int64)
        gate = tl.load(gates_ptr + slot).to(ACC)
        e, in_e, out_e = _expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E)
        # A tile wholly past the expert's output width adds nothing (the row is zero there).
        if m_block * BLOCK_M < out_e:
            m_ok = ms < out_e
            w_rows = w_ptr + e * C_OUT * C_IN + ms * C_IN  # [BLOCK_M]
            h_row = h_ptr + row * C_IN * P
            acc = expert_tile_product(
                tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC), w_rows, 1, m_ok, h_row, ps, p_ok, P, in_e,
                BLOCK_K, USE_DOT, DOT_UPCAST,
            )  # fmt: skip
            if HAS_BIAS:
                acc += tl.load(b_ptr + e * C_OUT + ms, mask=m_ok, other=0.0).to(ACC)[:, None]
            # Rounded to h's dtype first: the row as grouped_pointwise would have returned it.
            total += gate * acc.to(h_ptr.dtype.element_ty).to(ACC)
    c_ok = (ms < C_OUT)[:, None] & p_ok[None, :]
    tile = image * C_OUT * P + (ms * P)[:, None] + ps[None, :]
    if HAS_RESIDUAL:
        js = tl.arange(0, BLOCK_J)
        gate_sum = tl.sum(tl.load(gates_ptr + image * K + js, mask=js < K, other=0.0).to(ACC), 0)
        total += gate_sum * tl.load(res_ptr + tile, mask=c_ok, other=0.0).to(ACC)
    tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=c_ok)


#: The most pixels per float32 tile on a GPU: the kernel keeps two [BLOCK_M, BLOCK_P] float32
#: accumulators (the row's product and the image's sum); at the row kernel's 128 pixels ptxas
#: needs 255 registers for the float32 (FMA) product, at 64 fewer (see the AOT test).
_FP32_BLOCK_P = 64


def _blocks(c_out: int, c_in: int, pixels: int, dtype: torch.dtype) -> dict[str, int]:
    """``grouped_pointwise``'s row-kernel tiles, with float32's pixel tile capped on a GPU."""
    b = pointwise._rows_blocks(c_out, c_in, pixels, dtype)
    if dtype == torch.float32 and not _triton_common.interpreted() and b["block_p"] > _FP32_BLOCK_P:
        b["block_p"] = _FP32_BLOCK_P
        b["p_blocks"] = triton.cdiv(pixels, _FP32_BLOCK_P)
    return b


def _out_dtype(h: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    return h.dtype if residual is None else torch.promote_types(h.dtype, residual.dtype)


def pointwise_combine_fwd(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gates: torch.Tensor,
    offsets: torch.Tensor,
    inverse: torch.Tensor,
    sorted_slots: torch.Tensor,
    in_channels: list[int],
    out_channels: list[int],
) -> torch.Tensor:
    """out [B, Cout_max, H, W] (see ``moce_kernels.pointwise_combine``)."""
    h, weight, gates, offsets, inverse = (t.contiguous() for t in (h, weight, gates, offsets, inverse))
    bias = None if bias is None else bias.contiguous()
    residual = None if residual is None else residual.contiguous()
    batch, k = gates.shape
    num_experts, c_out, c_in = weight.shape
    _, _, height, width = h.shape
    pixels = height * width
    # int32 offsets inside a row: an error rather than wrapped offsets (wrong memory).
    for name, channels, shape in (("h", c_in, h.shape), ("the output", c_out, (batch, c_out, height, width))):
        _triton_common.check_int32_offsets("pointwise_combine", name, channels * pixels, tuple(shape))
    out = _triton_common.empty((batch, c_out, height, width), _out_dtype(h, residual), h.device)
    if out.numel() == 0:
        return out
    meta = _triton_common.expert_metadata(tuple(in_channels), tuple(out_channels), h.device)
    b = _blocks(c_out, c_in, pixels, h.dtype)
    with _triton_common.device_guard(h):
        pointwise_combine_kernel[(batch * b["p_blocks"] * b["m_blocks"],)](
            h, weight, h if bias is None else bias, offsets, meta, inverse, gates,
            h if residual is None else residual, out,
            c_in, c_out, pixels, num_experts, k, b["m_blocks"],
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, **pointwise._dot_flags(h.dtype),
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_J=triton.next_power_of_2(k),
            BLOCK_M=b["block_m"], BLOCK_K=b["block_k"], BLOCK_P=b["block_p"],
            ACC=_triton_common.acc_dtype(h, gates, residual)[1], num_warps=pointwise._num_warps(h.dtype),
        )  # fmt: skip
    return out


def pointwise_combine_bwd(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gates: torch.Tensor,
    offsets: torch.Tensor,
    inverse: torch.Tensor,
    sorted_slots: torch.Tensor,
    in_channels: list[int],
    out_channels: list[int],
    need_residual: bool,
    need_gates: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad h, grad weight, grad bias [E, Cout_max], grad residual or [0], grad gates or [0])."""
    grad_out, h, weight, gates, offsets = (t.contiguous() for t in (grad_out, h, weight, gates, offsets))
    slots, _, height, width = h.shape
    batch = gates.shape[0]
    c_out = weight.shape[1]
    rows_shape = (slots, c_out, height, width)
    features = c_out * height * width
    # Only the gates' gradient reads the rows' products; otherwise y only gives combine_bwd shapes.
    y = _triton_common.empty(rows_shape, h.dtype, h.device)
    if need_gates and y.numel():
        meta = _triton_common.expert_metadata(tuple(in_channels), tuple(out_channels), h.device)
        with _triton_common.device_guard(h):
            pointwise.launch_rows(h, weight, bias, offsets, meta, y, transpose=False)
    with _triton_common.device_guard(h):
        grad_rows, grad_gates = combine_bwd(
            grad_out.view(batch, features),
            y.view(slots, features),
            gates,
            inverse,
            sorted_slots,
            True,
            need_gates,
        )
    grad_h, grad_weight, grad_bias = pointwise.grouped_pointwise_bwd(
        grad_rows.view(rows_shape), h, weight, offsets, in_channels, out_channels
    )
    acc, _ = _triton_common.acc_dtype(h, gates, residual, grad_out)
    grad_residual = grad_out.new_empty((0,))
    if residual is not None:
        if need_residual:
            gate_sums = gates.to(acc).sum(1).view(batch, 1, 1, 1)
            grad_residual = (grad_out.to(acc) * gate_sums).to(residual.dtype)
        if need_gates and batch:
            dots = (grad_out.to(acc) * residual.to(acc)).view(batch, -1).sum(1, keepdim=True)
            grad_gates = (grad_gates.to(acc) + dots).to(gates.dtype)
    return grad_h, grad_weight, grad_bias, grad_residual, grad_gates


# --- torch.library registration ----------------------------------------------------------------
# custom_op + register_fake rather than triton_op: see moce_kernels/_library.py.


def _pointwise_combine_fwd_fake(h, weight, bias, residual, gates, offsets, inverse, sorted_slots, *widths):
    shape = (gates.shape[0], weight.shape[1], h.shape[2], h.shape[3])
    return h.new_empty(shape, dtype=_out_dtype(h, residual))


def _pointwise_combine_bwd_fake(
    grad_out, h, weight, bias, residual, gates, offsets, inverse, sorted_slots, in_channels, out_channels,
    need_residual, need_gates,
):  # fmt: skip
    if residual is not None and need_residual:
        grad_residual = residual.new_empty(residual.shape)
    else:
        grad_residual = grad_out.new_empty((0,))
    return (
        h.new_empty(h.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[:2]),
        grad_residual,
        gates.new_empty(gates.shape if need_gates else (0,)),
    )


_library.define_triton(
    "pointwise_combine",
    pointwise_combine_fwd,
    pointwise_combine_bwd,
    _pointwise_combine_fwd_fake,
    _pointwise_combine_bwd_fake,
    _autograd,
)


def pointwise_combine_triton(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: RoutingPlan,
    in_channels: list[int],
    out_channels: list[int],
    residual: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts' last 1x1 convolutions, residual, gates and the sum over k in one Triton
    launch, written in image order. Arguments as ``moce_kernels.pointwise_combine`` (which
    validates them first); the plan is never read on the host. Returns [B, Cout_max, H, W]
    contiguous.
    """
    return torch.ops.moce_triton.pointwise_combine_fwd(
        h.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        None if residual is None else residual.contiguous(),
        (plan.gates if gates is None else gates).contiguous(),
        plan.offsets.contiguous(),
        plan.inverse.contiguous(),
        plan.sorted_slots.contiguous(),
        list(in_channels),
        list(out_channels),
    )
