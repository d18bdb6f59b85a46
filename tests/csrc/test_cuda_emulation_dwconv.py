"""The CUDA kernels of grouped_dwconv and dwconv_gelu_gate, run on the CPU against the reference.

Their bodies (csrc/cuda/grouped_dwconv.cuh, dwconv_gelu_gate.cuh) run through the CUDA shim (see
tests/csrc/_emulation.py), driven as the .cu files drive them (cuda_emulation/dwconv_kernels.cpp:
the same geometry, 16-byte path and kernel class). That checks what the kernels compute: tile
and halo indexing, the kernel classes, block decoding, the fixed-order weight-gradient sums,
fills for channels past an expert's width. The GPU tests in tests/ops run them on a device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import pack_dwconv_weights
from moce_kernels.dwconv_gelu_gate.reference import dwconv_gelu_gate_reference
from moce_kernels.grouped_dwconv.reference import grouped_dwconv_reference
from tests.csrc._emulation import DTYPE_CODE, GUARD, Guarded, close, close_sums, i64, int64s

# (channels, kernel_sizes, rows per expert, H, W, K_max window): the trunk's single 3 x 3 and
# 7 x 7 experts and the experts' 3 and 7 (the 3 x 3 and 7 x 7 classes), mixed sizes up to 9 (the
# general class), 3 x 3 experts in a 9 x 9 window (the 3 x 3 class with an offset window), 1 x 1,
# empty experts, tiles cut by the image edge in both directions.
DWCONV_CASES = [
    pytest.param((6,), (3,), (2,), 37, 40, 3, id="trunk-3x3-37x40"),
    pytest.param((5,), (7,), (2,), 37, 40, 7, id="trunk-7x7-37x40"),
    pytest.param((4, 6), (3, 7), (1, 2), 33, 24, 7, id="experts-k37-33x24"),
    pytest.param((5, 3, 7, 2), (3, 5, 7, 9), (1, 0, 2, 1), 33, 45, 9, id="k3579-empty-33x45"),
    pytest.param((4, 6), (3, 1), (1, 2), 35, 16, 9, id="k31-in-9x9-window"),
    pytest.param((3,), (9,), (1,), 7, 8, 9, id="9x9-on-7x8"),
    pytest.param((8,), (3,), (1,), 1, 1, 3, id="1x1-image"),
]


def _dwconv_case(channels, kernel_sizes, counts, height, width, k_max, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(c, 1, k, k, generator=g) / k for c, k in zip(channels, kernel_sizes, strict=True)]
    biases = [torch.randn(c, generator=g) for c in channels]
    weight, bias, _, _ = pack_dwconv_weights(weights, biases)
    if weight.shape[-1] < k_max:  # a wider window than the experts need: zeros around them
        pad = (k_max - weight.shape[-1]) // 2
        weight = F.pad(weight, (pad, pad, pad, pad))
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    x = torch.randn(offsets[-1], max(channels), height, width, generator=g)
    return x.to(dtype), weight.to(dtype), bias.to(dtype), offsets


@pytest.mark.parametrize("scalar", [False, True], ids=["vectors", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("channels", "kernel_sizes", "counts", "height", "width", "k_max"), DWCONV_CASES)
def test_grouped_dwconv_kernels(
    emulated, channels, kernel_sizes, counts, height, width, k_max, dtype, scalar
):
    x, weight, bias, offsets = _dwconv_case(channels, kernel_sizes, counts, height, width, k_max, dtype)
    n, c = x.shape[:2]
    e = len(channels)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    # The reference in float32 on the same (rounded) values.
    xr, wr, br = (t.float().requires_grad_() for t in (x, weight, bias))
    want = grouped_dwconv_reference(xr, wr, br, offsets, channels, kernel_sizes)
    want.backward(grad_y.float())

    args = (
        int64s(offsets),
        int64s(channels),
        int64s(kernel_sizes),
        e,
        i64(n),
        i64(c),
        i64(height),
        i64(width),
        i64(k_max),
    )
    gx_in, gw_in, gb_in, gy_in = (Guarded(t.shape, dtype, t) for t in (x, weight, bias, grad_y))
    y = Guarded(x.shape, dtype)
    emulated.grouped_dwconv_fwd(DTYPE_CODE[dtype], gx_in.ptr, gw_in.ptr, gb_in.ptr, *args, y.ptr, int(scalar))
    close(y.check("y"), want, dtype, "y")

    grad_x, grad_w, grad_b = Guarded(x.shape, dtype), Guarded(weight.shape, dtype), Guarded(bias.shape, dtype)
    emulated.grouped_dwconv_bwd(
        DTYPE_CODE[dtype],
        gy_in.ptr,
        gx_in.ptr,
        gw_in.ptr,
        *args,
        grad_x.ptr,
        grad_w.ptr,
        grad_b.ptr,
        int(scalar),
    )
    close(grad_x.check("grad_x"), xr.grad, dtype, "grad_x")
    # Weight and bias gradients sum over whole images.
    for got, ref, name in ((grad_w, wr.grad, "grad_w"), (grad_b, br.grad, "grad_b")):
        close_sums(got.check(name), ref, dtype, name)


def test_grouped_dwconv_rows_no_expert_owns_get_nan(emulated):
    """Offsets that stop short of N (never from a RoutingPlan): the rows past them are NaN, the
    others exact, and nothing outside the output is written."""
    x, weight, bias, _ = _dwconv_case((4,), (3,), (3,), 9, 16, 3, torch.float32)
    offsets = [0, 2]  # row 2 belongs to no expert
    want = grouped_dwconv_reference(x[:2], weight, bias, offsets, [4], [3])
    gx, gw, gb = (Guarded(t.shape, torch.float32, t) for t in (x, weight, bias))
    y = Guarded(x.shape, torch.float32)
    emulated.grouped_dwconv_fwd(
        0,
        gx.ptr,
        gw.ptr,
        gb.ptr,
        int64s(offsets),
        int64s([4]),
        int64s([3]),
        1,
        i64(3),
        i64(4),
        i64(9),
        i64(16),
        i64(3),
        y.ptr,
        0,
    )
    guards = torch.cat([y.buffer[:GUARD], y.buffer[-GUARD:]])
    assert guards.isnan().all()
    assert y.tensor[2].isnan().all()
    close(y.tensor[:2], want, torch.float32, "rows with an expert")


GATE_CASES = [
    pytest.param(1, 3, 3, 37, 40, True, id="K3-B1-37x40"),
    pytest.param(2, 2, 5, 33, 45, True, id="K5-33x45"),
    pytest.param(1, 2, 1, 8, 8, False, id="K1-no-bias"),
    pytest.param(2, 1, 9, 6, 35, True, id="K9-6x35"),
]


@pytest.mark.parametrize("scalar", [False, True], ids=["vectors", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("batch", "ch", "k", "height", "width", "has_bias"), GATE_CASES)
def test_dwconv_gelu_gate_kernels(emulated, batch, ch, k, height, width, has_bias, dtype, scalar):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 2 * ch, height, width, generator=g).to(dtype)
    weight = (torch.randn(2 * ch, k, k, generator=g) / k).to(dtype)
    bias = torch.randn(2 * ch, generator=g).to(dtype) if has_bias else None
    grad_y = torch.randn(batch, ch, height, width, generator=g).to(dtype)

    xr, wr = x.float().requires_grad_(), weight.float().requires_grad_()
    br = bias.float().requires_grad_() if has_bias else None
    want = dwconv_gelu_gate_reference(xr, wr, br)
    want.backward(grad_y.float())

    gx_in, gw_in, gy_in = (Guarded(t.shape, dtype, t) for t in (x, weight, grad_y))
    gb_in = Guarded(bias.shape, dtype, bias) if has_bias else None
    bias_ptr = gb_in.ptr if has_bias else None
    dims = (i64(batch), i64(ch), i64(height), i64(width), i64(k))
    y = Guarded(grad_y.shape, dtype)
    emulated.dwconv_gelu_gate_fwd(
        DTYPE_CODE[dtype], gx_in.ptr, gw_in.ptr, bias_ptr, *dims, y.ptr, int(scalar)
    )
    close(y.check("y"), want, dtype, "y")

    grad_x, grad_w, grad_b = Guarded(x.shape, dtype), Guarded(weight.shape, dtype), Guarded((2 * ch,), dtype)
    emulated.dwconv_gelu_gate_bwd(
        DTYPE_CODE[dtype],
        gy_in.ptr,
        gx_in.ptr,
        gw_in.ptr,
        bias_ptr,
        *dims,
        grad_x.ptr,
        grad_w.ptr,
        grad_b.ptr,
        int(scalar),
    )
    close(grad_x.check("grad_x"), xr.grad, dtype, "grad_x")
    want_b = br.grad if has_bias else torch.zeros(2 * ch)
    for got, ref, name in ((grad_w, wr.grad, "grad_w"), (grad_b, want_b, "grad_b")):
        close_sums(got.check(name), ref, dtype, name)
