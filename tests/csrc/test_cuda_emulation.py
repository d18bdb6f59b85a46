"""The CUDA kernels of grouped_dwconv and dwconv_gelu_gate, run on the CPU against the reference.

CI has no GPU, so the CUDA kernels otherwise run only when a device is lent. Here their bodies
(csrc/cuda/grouped_dwconv.cuh, dwconv_gelu_gate.cuh) are compiled with the host compiler against
tests/csrc/cuda_emulation/cuda_shim.h, which runs each block as threads with real barriers and warp
shuffles, and driven as the .cu files drive them (cuda_emulation/dwconv_kernels.cpp: the same
geometry, 16-byte path and kernel class). That checks what the kernels compute: tile and halo
indexing, the kernel classes, block decoding, the fixed-order weight-gradient sums, fills for
channels past an expert's width. Not what only a GPU shows (timing, alignment faults, resource
limits): the GPU tests in tests/ops still run these kernels on a device.

Every output lies between NaN guard zones in a NaN-filled buffer: an element left unwritten, or
a write or read outside its tensor, shows up as a NaN or a changed guard. The kernels are built
with UndefinedBehaviorSanitizer's alignment and bounds checks: a report fails the call's test. A
16-byte store to a misaligned address (one the GPU would fault on) reports and then crashes the
process on x86's aligned store ("Fatal Python error: Segmentation fault" naming this file's
test); the report is then in the test run's temporary directory, cuda_emulation*/ubsan.*.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import include_paths

from moce_kernels import pack_dwconv_weights
from moce_kernels.dwconv_gelu_gate.reference import dwconv_gelu_gate_reference
from moce_kernels.grouped_dwconv.reference import grouped_dwconv_reference

HERE = Path(__file__).resolve().parent / "cuda_emulation"
GUARD = 64  # elements of NaN on each side of every buffer (a multiple of 16 bytes in both dtypes)
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}

i64 = ctypes.c_int64
ptr = ctypes.c_void_p


class Emulated:
    """The compiled kernels; each call fails the test when UndefinedBehaviorSanitizer reported a
    misaligned or out-of-bounds access during it (a 16-byte shared-memory store at an address the
    GPU would fault on runs fine on x86: the sanitizer is what sees it)."""

    def __init__(self, dll: ctypes.CDLL, log_dir: Path) -> None:
        self._dll, self._log_dir = dll, log_dir

    def __getattr__(self, name: str):
        fn = getattr(self._dll, name)
        fn.restype = None

        def call(*args) -> None:
            fn(*args)
            reports = sorted(self._log_dir.glob("ubsan*"))
            text = "".join(r.read_text() for r in reports)
            for r in reports:
                r.unlink()
            assert not reports, f"{name}: undefined behaviour in the kernels:\n{text[-4000:]}"

        return call


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Emulated:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ to compile the emulated CUDA kernels")
    build = tmp_path_factory.mktemp("cuda_emulation")
    lib = build / "dwconv_kernels.so"
    includes = [f"-I{p}" for p in include_paths()[:1]]  # c10's headers only
    cmd = [
        compiler,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-pthread",
        "-Wall",
        "-Werror",
        "-Wno-unknown-pragmas",
        "-fsanitize=alignment,bounds",
        *includes,
        "-o",
        str(lib),
        str(HERE / "dwconv_kernels.cpp"),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert done.returncode == 0, f"compiling the emulated kernels failed:\n{done.stderr[-4000:]}"
    # Read by the sanitizer's runtime when the library loads: report to files, keep running.
    os.environ["UBSAN_OPTIONS"] = f"log_path={build / 'ubsan'}:halt_on_error=0:print_stacktrace=1"
    return Emulated(ctypes.CDLL(str(lib)), build)


class Guarded:
    """A tensor in the middle of a NaN-filled buffer; ``check`` asserts the guards kept their bits."""

    def __init__(self, shape, dtype, values: torch.Tensor | None = None) -> None:
        numel = int(torch.Size(shape).numel())
        self.buffer = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype)
        self.tensor = self.buffer[GUARD : GUARD + numel].view(shape)
        if values is not None:
            self.tensor.copy_(values)

    @property
    def ptr(self) -> ptr:
        return ptr(self.tensor.data_ptr())

    def check(self, name: str) -> torch.Tensor:
        guards = torch.cat([self.buffer[:GUARD], self.buffer[-GUARD:]])
        assert guards.isnan().all(), f"{name}: a write outside the tensor"
        assert not self.tensor.isnan().any(), f"{name}: elements left unwritten (NaN)"
        return self.tensor


def _int64s(values) -> ctypes.Array:
    return (i64 * len(values))(*values)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    # float32: the same sums in another order; bfloat16: one rounding of the output (2^-8).
    rtol, atol = (2e-5, 2e-5) if dtype == torch.float32 else (1.6e-2, 1e-2)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=what)


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
def test_grouped_dwconv_kernels(kernels, channels, kernel_sizes, counts, height, width, k_max, dtype, scalar):
    x, weight, bias, offsets = _dwconv_case(channels, kernel_sizes, counts, height, width, k_max, dtype)
    n, c = x.shape[:2]
    e = len(channels)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    # The reference in float32 on the same (rounded) values.
    xr, wr, br = (t.float().requires_grad_() for t in (x, weight, bias))
    want = grouped_dwconv_reference(xr, wr, br, offsets, channels, kernel_sizes)
    want.backward(grad_y.float())

    args = (
        _int64s(offsets),
        _int64s(channels),
        _int64s(kernel_sizes),
        e,
        i64(n),
        i64(c),
        i64(height),
        i64(width),
        i64(k_max),
    )
    gx_in, gw_in, gb_in, gy_in = (Guarded(t.shape, dtype, t) for t in (x, weight, bias, grad_y))
    y = Guarded(x.shape, dtype)
    kernels.grouped_dwconv_fwd(DTYPE_CODE[dtype], gx_in.ptr, gw_in.ptr, gb_in.ptr, *args, y.ptr, int(scalar))
    _close(y.check("y"), want, dtype, "y")

    grad_x, grad_w, grad_b = Guarded(x.shape, dtype), Guarded(weight.shape, dtype), Guarded(bias.shape, dtype)
    kernels.grouped_dwconv_bwd(
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
    _close(grad_x.check("grad_x"), xr.grad, dtype, "grad_x")
    # Weight and bias gradients sum over whole images: compared relative to their scale.
    for got, ref, name in ((grad_w, wr.grad, "grad_w"), (grad_b, br.grad, "grad_b")):
        scale = ref.abs().max().clamp_min(1.0)
        _close(got.check(name) / scale, ref / scale, dtype, name)


def test_grouped_dwconv_rows_no_expert_owns_get_nan(kernels):
    """Offsets that stop short of N (never from a RoutingPlan): the rows past them are NaN, the
    others exact, and nothing outside the output is written."""
    x, weight, bias, _ = _dwconv_case((4,), (3,), (3,), 9, 16, 3, torch.float32)
    offsets = [0, 2]  # row 2 belongs to no expert
    want = grouped_dwconv_reference(x[:2], weight, bias, offsets, [4], [3])
    gx, gw, gb = (Guarded(t.shape, torch.float32, t) for t in (x, weight, bias))
    y = Guarded(x.shape, torch.float32)
    kernels.grouped_dwconv_fwd(
        0,
        gx.ptr,
        gw.ptr,
        gb.ptr,
        _int64s(offsets),
        _int64s([4]),
        _int64s([3]),
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
    _close(y.tensor[:2], want, torch.float32, "rows with an expert")


GATE_CASES = [
    pytest.param(1, 3, 3, 37, 40, True, id="K3-B1-37x40"),
    pytest.param(2, 2, 5, 33, 45, True, id="K5-33x45"),
    pytest.param(1, 2, 1, 8, 8, False, id="K1-no-bias"),
    pytest.param(2, 1, 9, 6, 35, True, id="K9-6x35"),
]


@pytest.mark.parametrize("scalar", [False, True], ids=["vectors", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("batch", "ch", "k", "height", "width", "has_bias"), GATE_CASES)
def test_dwconv_gelu_gate_kernels(kernels, batch, ch, k, height, width, has_bias, dtype, scalar):
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
    kernels.dwconv_gelu_gate_fwd(DTYPE_CODE[dtype], gx_in.ptr, gw_in.ptr, bias_ptr, *dims, y.ptr, int(scalar))
    _close(y.check("y"), want, dtype, "y")

    grad_x, grad_w, grad_b = Guarded(x.shape, dtype), Guarded(weight.shape, dtype), Guarded((2 * ch,), dtype)
    kernels.dwconv_gelu_gate_bwd(
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
    _close(grad_x.check("grad_x"), xr.grad, dtype, "grad_x")
    want_b = br.grad if has_bias else torch.zeros(2 * ch)
    for got, ref, name in ((grad_w, wr.grad, "grad_w"), (grad_b, want_b, "grad_b")):
        scale = ref.abs().max().clamp_min(1.0)
        _close(got.check(name) / scale, ref / scale, dtype, name)
