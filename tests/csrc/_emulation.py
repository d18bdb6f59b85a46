"""Running csrc/cuda's kernels on the CPU: the build and the helpers of tests/csrc/test_cuda_emulation_*.

CI has no GPU, so the CUDA kernels otherwise run only when a device is lent. Here their bodies
(csrc/cuda/*.cuh) are compiled with the host compiler against cuda_emulation/cuda_shim.h, which
runs each block as threads with real barriers, warp shuffles and shared memory, and driven by
cuda_emulation/*_kernels.cpp as the .cu files drive them. Not what only a GPU shows (timing,
resource limits, the memory model beyond barriers): the GPU tests in tests/ops run the kernels on
a device.

Every output lies between NaN guard zones in a NaN-filled buffer (:class:`Guarded`): an element
left unwritten, or a write outside its tensor, shows up as a NaN or a changed guard, and a read
outside as a NaN in the result. A call fails its test when the shim saw what a GPU leaves
undefined (a warp-wide primitive after some of the warp's lanes returned, a barrier after some
threads returned) or when UndefinedBehaviorSanitizer (built in: alignment and bounds checks)
reported a misaligned or out-of-bounds access. A 16-byte access to a misaligned address (one the
GPU faults on) reports and then crashes the process on x86's aligned instruction ("Fatal Python
error: Segmentation fault" naming the test); the report is then in the run's temporary
directory, cuda_emulation*/ubsan.*.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

HERE = Path(__file__).resolve().parent / "cuda_emulation"
SOURCES = sorted(HERE.glob("*.cpp"))
GUARD = 64  # elements of NaN on each side of every buffer (a multiple of 16 bytes in every dtype)
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
#: The drivers that return a status (the others return nothing).
RETURNS = {"route_fwd": ctypes.c_int}

i64 = ctypes.c_int64
ptr = ctypes.c_void_p


class Emulated:
    """The compiled drivers; each call fails the test on what the shim or the sanitizer reported."""

    def __init__(self, dll: ctypes.CDLL, log_dir: Path) -> None:
        self._dll, self._log_dir = dll, log_dir
        self._dll.emulation_errors.restype = ctypes.c_char_p

    def __getattr__(self, name: str):
        fn = getattr(self._dll, name)
        fn.restype = RETURNS.get(name)

        def call(*args):
            result = fn(*args)
            shim = self._dll.emulation_errors().decode()
            reports = sorted(self._log_dir.glob("ubsan*"))
            text = "".join(r.read_text() for r in reports)
            for r in reports:
                r.unlink()
            assert not shim, f"{name}: what a GPU leaves undefined:\n{shim}"
            assert not reports, f"{name}: undefined behaviour in the kernels:\n{text[-4000:]}"
            return result

        return call


def build(directory: Path) -> Emulated:
    """Compile every driver into one library in ``directory`` (skips without g++)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ to compile the emulated CUDA kernels")
    lib = directory / "cuda_emulation.so"
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
        f"-I{HERE / 'include'}",  # CUDA headers the shim replaces (cuda_pipeline.h)
        *[f"-I{p}" for p in include_paths()[:1]],  # c10's and ATen's headers (no linking)
        "-o",
        str(lib),
        *map(str, SOURCES),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert done.returncode == 0, f"compiling the emulated kernels failed:\n{done.stderr[-4000:]}"
    # Read by the sanitizer's runtime when the library loads: report to files, keep running.
    os.environ["UBSAN_OPTIONS"] = f"log_path={directory / 'ubsan'}:halt_on_error=0:print_stacktrace=1"
    return Emulated(ctypes.CDLL(str(lib)), directory)


class Guarded:
    """A tensor in the middle of a NaN-filled buffer; ``check`` asserts the guards kept their bits
    and every element was written."""

    def __init__(self, shape, dtype, values: torch.Tensor | None = None) -> None:
        numel = int(torch.Size(shape).numel())
        fill = float("nan") if dtype.is_floating_point else -(2**62)
        self.buffer = torch.full((numel + 2 * GUARD,), fill, dtype=dtype)
        self.tensor = self.buffer[GUARD : GUARD + numel].view(shape)
        if values is not None:
            self.tensor.copy_(values)

    @property
    def ptr(self) -> ptr:
        return ptr(self.tensor.data_ptr())

    def check(self, name: str) -> torch.Tensor:
        if self.buffer.is_floating_point():
            untouched, unwritten = self.buffer.isnan(), self.tensor.isnan()
        else:
            untouched, unwritten = self.buffer == -(2**62), self.tensor == -(2**62)
        assert untouched[:GUARD].all() and untouched[-GUARD:].all(), f"{name}: a write outside the tensor"
        assert not unwritten.any(), f"{name}: elements left unwritten"
        return self.tensor


def int64s(values) -> ctypes.Array:
    return (i64 * len(values))(*values)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """float32: the same sums in another order; bfloat16: one rounding of the output (2^-8)."""
    rtol, atol = (2e-5, 2e-5) if dtype == torch.float32 else (1.6e-2, 1e-2)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=what)


def close_sums(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``close`` for gradients that sum over whole images or rows (weights, biases, gates),
    relative to their scale: their absolute rounding grows with the terms summed."""
    scale = want.abs().max().clamp_min(1.0)
    close(got / scale, want / scale, dtype, what)
