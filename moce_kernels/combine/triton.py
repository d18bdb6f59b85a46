"""``combine`` in Triton: expert outputs back to image order, gate-weighted, one pass each way.

A row's features are one flat run of F elements in memory order (any trailing shape; contiguous
and channels_last 4-d y used in place, other layouts copied first); the output keeps y's layout.
Accumulation in float32 (float64 when y or the gates are float64), in a fixed order:

- forward: program (image b, chunk c) computes ``sum_j gates[b, j] * y[inverse[b*k + j], chunk]``
  for j = 0..k-1 and writes its chunk of ``out[b]`` once;
- backward: program (sorted row i, chunk c), with slot ``s = sorted_slots[i] = (b, j)``, writes
  ``grad_y[i, chunk] = gates[b, j] * grad_out[b, chunk]`` (a gather: each element written once)
  and the partial dot product ``y[i, chunk] . grad_out[b, chunk]`` into ``partials[i, c]``; a
  second small kernel sums, per slot s, ``partials[inverse[s], :]`` in chunk order into
  ``grad_gates[s]``. Deterministic, no atomics.

The (row, chunk) programs are numbered on a 1-d grid (``_triton_common.row_chunk``: CUDA caps a
grid's second dimension at 65535).

Indices outside the tensors (a corrupted plan; its values are not checked on the host, that
would sync) are never dereferenced: what depends on them comes out NaN.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moce_kernels import _library
from moce_kernels._triton_common import acc_dtype, row_block, row_chunk
from moce_kernels.combine import _autograd
from moce_kernels.dispatch.triton import as_rows, check_plan_index, from_rows
from moce_kernels.route.reference import RoutingPlan


@triton.jit
def combine_fwd_kernel(
    y_ptr,  # [S, F] float, expert order
    gates_ptr,  # [B, K] float
    inverse_ptr,  # [S] integer: the sorted row of slot b * K + j
    out_ptr,  # [B, F] y's dtype
    S,
    F,
    K,
    NUM_CHUNKS,
    ACC: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    image, chunk = row_chunk(NUM_CHUNKS)
    cols = chunk * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < F
    acc = tl.zeros([BLOCK_F], dtype=ACC)
    for j in range(K):
        row = tl.load(inverse_ptr + image * K + j).to(tl.int64)
        ok = (row >= 0) & (row < S)
        row = tl.where(ok, row, 0)
        gate = tl.load(gates_ptr + image * K + j).to(ACC)
        vals = tl.load(y_ptr + row * F + cols, mask=col_ok & ok, other=0.0).to(ACC)
        acc += tl.where(ok, gate * vals, float("nan"))
    tl.store(out_ptr + image * F + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def combine_bwd_kernel(
    grad_out_ptr,  # [B, F] float
    y_ptr,  # [S, F] float (unused without NEED_GATES)
    gates_ptr,  # [B, K] float
    sorted_slots_ptr,  # [S] integer: the slot b * K + j of sorted row i
    grad_y_ptr,  # [S, F] y's dtype (unused without NEED_Y)
    partials_ptr,  # [S, NUM_CHUNKS] ACC (unused without NEED_GATES)
    S,
    F,
    K,
    NUM_CHUNKS,
    ACC: tl.constexpr,
    NEED_Y: tl.constexpr,
    NEED_GATES: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    row, chunk = row_chunk(NUM_CHUNKS)
    cols = chunk * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < F
    slot = tl.load(sorted_slots_ptr + row).to(tl.int64)
    ok = (slot >= 0) & (slot < S)
    slot = tl.where(ok, slot, 0)
    image = slot // K
    grad_out = tl.load(grad_out_ptr + image * F + cols, mask=col_ok & ok, other=0.0).to(ACC)
    if NEED_Y:
        gate = tl.load(gates_ptr + slot).to(ACC)
        grad_y = tl.where(ok, gate * grad_out, float("nan"))
        tl.store(grad_y_ptr + row * F + cols, grad_y.to(grad_y_ptr.dtype.element_ty), mask=col_ok)
    if NEED_GATES:
        vals = tl.load(y_ptr + row * F + cols, mask=col_ok, other=0.0).to(ACC)
        partial = tl.sum(vals * grad_out, axis=0)
        partial = tl.where(ok, partial, float("nan"))
        tl.store(partials_ptr + row * NUM_CHUNKS + chunk, partial)


@triton.jit
def combine_gates_bwd_kernel(
    partials_ptr,  # [S, NUM_CHUNKS] ACC, by sorted row
    inverse_ptr,  # [S] integer
    grad_gates_ptr,  # [S] (= [B, K]) gates' dtype
    S,
    NUM_CHUNKS,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_ok = slots < S
    row = tl.load(inverse_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
    ok = (row >= 0) & (row < S)
    row = tl.where(ok, row, 0)
    acc = tl.zeros([BLOCK_S], dtype=ACC)
    # Fixed chunk order: the same sum on every run.
    for start in range(0, NUM_CHUNKS, BLOCK_C):
        chunks = start + tl.arange(0, BLOCK_C)
        mask = (slot_ok & ok)[:, None] & (chunks < NUM_CHUNKS)[None, :]
        acc += tl.sum(
            tl.load(partials_ptr + row[:, None] * NUM_CHUNKS + chunks[None, :], mask=mask, other=0.0), 1
        )
    acc = tl.where(ok, acc, float("nan"))
    tl.store(grad_gates_ptr + slots, acc.to(grad_gates_ptr.dtype.element_ty), mask=slot_ok)


# --- launchers ------------------------------------------------------------------------------


def combine_fwd(y: torch.Tensor, gates: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """[B, F] in y's dtype from contiguous y [S, F], gates [B, K], inverse [S]."""
    slots, features = y.shape
    batch, k = gates.shape
    out = torch.empty(batch, features, dtype=y.dtype, device=y.device)
    if batch == 0 or features == 0:
        return out
    block, warps = row_block(features)
    chunks = triton.cdiv(features, block)
    acc = acc_dtype(y, gates)[1]
    combine_fwd_kernel[(batch * chunks,)](
        y, gates, inverse, out, slots, features, k, chunks, ACC=acc, BLOCK_F=block, num_warps=warps
    )
    return out


def combine_bwd(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    gates: torch.Tensor,
    inverse: torch.Tensor,
    sorted_slots: torch.Tensor,
    need_y: bool,
    need_gates: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y [S, F] or [0], grad_gates [B, K] or [0]); [0] when not needed. Inputs that are not
    contiguous are copied first."""
    grad_out, y, gates, inverse, sorted_slots = (
        t.contiguous() for t in (grad_out, y, gates, inverse, sorted_slots)
    )
    slots, features = y.shape
    batch, k = gates.shape
    dev = y.device
    grad_y = torch.empty((slots, features) if need_y else (0,), dtype=y.dtype, device=dev)
    grad_gates = torch.empty((batch, k) if need_gates else (0,), dtype=gates.dtype, device=dev)
    if slots == 0 or not (need_y or need_gates):
        return grad_y, grad_gates
    if features == 0:
        if need_gates:
            grad_gates.zero_()  # an empty dot product
        return grad_y, grad_gates
    acc_torch, acc = acc_dtype(y, gates, grad_out)
    block, warps = row_block(features)
    num_chunks = triton.cdiv(features, block)
    partials = torch.empty(
        (slots, num_chunks) if need_gates else (0,),
        dtype=acc_torch,
        device=dev,
    )
    combine_bwd_kernel[(slots * num_chunks,)](
        grad_out,
        y,
        gates,
        sorted_slots,
        grad_y if need_y else y,
        partials if need_gates else y,
        slots,
        features,
        k,
        num_chunks,
        ACC=acc,
        NEED_Y=need_y,
        NEED_GATES=need_gates,
        BLOCK_F=block,
        num_warps=warps,
    )
    if need_gates:
        block_s = 64
        combine_gates_bwd_kernel[(triton.cdiv(slots, block_s),)](
            partials,
            inverse,
            grad_gates,
            slots,
            num_chunks,
            ACC=acc,
            BLOCK_S=block_s,
            BLOCK_C=min(64, max(2, triton.next_power_of_2(num_chunks))),
            num_warps=4,
        )
    return grad_y, grad_gates


# --- torch.library registration --------------------------------------------------------------
# custom_op + register_fake rather than triton_op: see moce_kernels/_library.py.


def _combine_fwd_impl(
    y: torch.Tensor, gates: torch.Tensor, inverse: torch.Tensor, sorted_slots: torch.Tensor
) -> torch.Tensor:
    return combine_fwd(y.contiguous(), gates.contiguous(), inverse.contiguous())


def _combine_fwd_fake(y, gates, inverse, sorted_slots):
    return y.new_empty(gates.shape[0], y.shape[1])


def _combine_bwd_fake(grad_out, y, gates, inverse, sorted_slots, need_y, need_gates):
    grad_y = y.new_empty(y.shape if need_y else (0,))
    grad_gates = gates.new_empty(gates.shape if need_gates else (0,))
    return grad_y, grad_gates


_combine_fwd_op = _library.define_triton(
    "combine",
    _combine_fwd_impl,
    combine_bwd,
    _combine_fwd_fake,
    _combine_bwd_fake,
    _autograd,
    make_backward=functools.partial(_autograd.make_backward, takes_needs=True),
)


def combine_triton(y: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`moce_kernels.combine` with the Triton kernels (``backend="triton"``).

    Arguments as ``combine`` (which validates them first): y [B * k, ...] float in the plan's
    expert order, optional gates [B, k] (default ``plan.gates``). Returns [B, ...] in y's dtype
    and layout (contiguous, or channels_last for a channels_last 4-d y), accumulated in float32
    (float64 for float64 inputs) in a fixed order. Differentiable in y and the gates
    (deterministic backward, no atomics).

    Raises:
        TypeError / ValueError: plan index tensors of the wrong dtype or length.
    """
    gates = plan.gates if gates is None else gates
    slots = plan.batch_size * plan.k
    check_plan_index("inverse", plan.inverse, slots)
    check_plan_index("sorted_slots", plan.sorted_slots, slots)
    if tuple(gates.shape) != (plan.batch_size, plan.k):
        raise ValueError(f"gates must have shape {(plan.batch_size, plan.k)}, got {tuple(gates.shape)}")
    rows, layout = as_rows(y)
    out = _combine_fwd_op(rows, gates, plan.inverse, plan.sorted_slots)
    return from_rows(out, (plan.batch_size, *y.shape[1:]), layout)
