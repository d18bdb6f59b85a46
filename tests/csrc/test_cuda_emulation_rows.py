"""The CUDA kernels of dispatch and combine, run on the CPU (see tests/csrc/_emulation.py).

Against the C++ CPU kernels of the same op contract (moce::dispatch_* / combine_* on CPU tensors,
held to the reference by tests/ops), on a routing plan from moce::route_fwd: rows copied, summed
and weighted the same, with the .cu files' grid caps and with caps of 1-2 blocks, so that the
kernels' grid-stride loops along and down the rows run too.
"""

from __future__ import annotations

import pytest
import torch

from tests.csrc._emulation import DTYPE_CODE, Guarded, close, close_sums, i64
from tests.ops._helpers import skip_unless_extension_built

# (batch, E, k, row shape): rows of an odd number of bytes (narrow words), of whole 16-byte
# vectors, and long enough for several blocks along a row.
CASES = [
    pytest.param(3, 4, 2, (3, 5, 7), id="B3-k2-odd-rows"),
    pytest.param(1, 3, 1, (4, 8, 8), id="B1-k1"),
    pytest.param(5, 4, 3, (16, 16, 16), id="B5-k3-long-rows"),
]
CAPS = [pytest.param((1 << 20, 65535), id="cu-grid"), pytest.param((1, 2), id="strided-grid")]


def _plan(batch, num_experts, k):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(batch, num_experts, generator=g)
    gates, _, _, _, _, _, sorted_slots, sorted_images, inverse = torch.ops.moce.route_fwd(logits, None, k)
    return gates, sorted_slots, sorted_images, inverse


@pytest.mark.parametrize("caps", CAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("batch", "num_experts", "k", "row"), CASES)
def test_dispatch_and_combine_kernels(emulated, batch, num_experts, k, row, dtype, caps):
    skip_unless_extension_built()
    gates, sorted_slots, sorted_images, inverse = _plan(batch, num_experts, k)
    slots, features = batch * k, int(torch.Size(row).numel())
    g = torch.Generator().manual_seed(6)
    x = torch.randn(batch, *row, generator=g).to(dtype)
    y = torch.randn(slots, *row, generator=g).to(dtype)
    grad_rows = torch.randn(slots, *row, generator=g).to(dtype)
    grad_images = torch.randn(batch, *row, generator=g).to(dtype)
    cap = (i64(caps[0]), i64(caps[1]))
    i64t, f32 = torch.int64, torch.float32
    g_images, g_inverse = Guarded((slots,), i64t, sorted_images), Guarded((slots,), i64t, inverse)
    g_slots, g_gates = Guarded((slots,), i64t, sorted_slots), Guarded(gates.shape, f32, gates)
    g_x, g_y = Guarded(x.shape, dtype, x), Guarded(y.shape, dtype, y)
    g_rows, g_img = Guarded(y.shape, dtype, grad_rows), Guarded(x.shape, dtype, grad_images)

    out = Guarded(y.shape, dtype)
    row_bytes = features * x.element_size()
    emulated.dispatch_fwd(g_x.ptr, g_images.ptr, i64(batch), i64(slots), i64(row_bytes), out.ptr, *cap)
    assert torch.equal(out.check("dispatch"), torch.ops.moce.dispatch_fwd(x, sorted_images, inverse))

    grad_x = Guarded(x.shape, dtype)
    emulated.dispatch_bwd(
        DTYPE_CODE[dtype], g_rows.ptr, g_inverse.ptr, i64(batch), i64(k), i64(features), grad_x.ptr, *cap
    )
    close(
        grad_x.check("dispatch grad_x"),
        torch.ops.moce.dispatch_bwd(grad_rows, inverse, batch),
        dtype,
        "grad_x",
    )

    combined = Guarded(x.shape, dtype)
    emulated.combine_fwd(
        DTYPE_CODE[dtype],
        g_y.ptr,
        g_gates.ptr,
        g_inverse.ptr,
        i64(batch),
        i64(k),
        i64(features),
        combined.ptr,
        *cap,
    )
    want = torch.ops.moce.combine_fwd(y, gates, inverse, sorted_slots)
    close(combined.check("combine"), want, dtype, "combine")

    grad_y, grad_gates = Guarded(y.shape, dtype), Guarded((slots,), f32)
    emulated.combine_bwd(
        DTYPE_CODE[dtype],
        g_img.ptr,
        g_y.ptr,
        g_gates.ptr,
        g_inverse.ptr,
        g_slots.ptr,
        i64(slots),
        i64(k),
        i64(features),
        grad_y.ptr,
        grad_gates.ptr,
        *cap,
    )
    want_y, want_gates = torch.ops.moce.combine_bwd(grad_images, y, gates, inverse, sorted_slots)
    close(grad_y.check("combine grad_y"), want_y, dtype, "grad_y")
    # Each gate's gradient sums a whole row.
    close_sums(grad_gates.check("grad_gates").view(want_gates.shape), want_gates, dtype, "grad_gates")


def test_dispatch_out_of_range_index_gives_nan_rows(emulated):
    """An index past the batch (never from a RoutingPlan) fills its row with all-ones bits (NaN),
    as the CPU kernel does, and never reads outside x."""
    skip_unless_extension_built()
    x = torch.randn(2, 3, 4)
    index = torch.tensor([1, 7, 0])
    g_x, g_index = Guarded(x.shape, torch.float32, x), Guarded((3,), torch.int64, index)
    out = Guarded((3, 3, 4), torch.float32)
    emulated.dispatch_fwd(g_x.ptr, g_index.ptr, i64(2), i64(3), i64(48), out.ptr, i64(1 << 20), i64(65535))
    got = out.tensor
    assert got[1].isnan().all()
    assert torch.equal(got[0], x[1]) and torch.equal(got[2], x[0])
    assert out.buffer[:64].isnan().all() and out.buffer[-64:].isnan().all()
