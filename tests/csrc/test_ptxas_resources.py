"""Registers and spills of the depthwise CUDA kernels on sm_90, read from ptxas (no GPU needed).

A block of 256 threads at more than 40 registers leaves fewer than 6 blocks per SM (65,536
registers), and these kernels keep the memory system busy only through the blocks in flight: the
general class (kernel sizes up to 9) takes 74 registers, 3 blocks per SM. The 3 x 3 class, which
runs the trunk's depthwise convolutions and the GDFN's gate, must stay at or under 40 registers
without spilling (the 7 x 7 class is not held to a number: see csrc/cuda/grouped_dwconv.cuh).
Compiled with the flags setup.py uses; skipped where nvcc or the CUDA headers are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

CSRC = Path(__file__).resolve().parents[2] / "csrc"
MAX_REGISTERS_3X3 = 40


def _cuda_home() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and all((Path(root) / part).exists() for part in ("bin/nvcc", "include/cuda_runtime.h")):
            return Path(root)
    return None


def _ptxas_report(source: Path, tmp_path: Path) -> dict[str, tuple[int, int]]:
    """{mangled kernel name: (registers, spill-store bytes)} for one .cu file, sm_90."""
    cuda = _cuda_home()
    if cuda is None or shutil.which("c++") is None:
        pytest.skip("needs nvcc and the CUDA headers (CUDA_HOME or /usr/local/cuda)")
    cmd = [
        str(cuda / "bin" / "nvcc"),
        "-O3",
        "--expt-relaxed-constexpr",
        "-std=c++20",
        "-arch=sm_90",
        "-Xptxas",
        "-v",
        "-cubin",
        "-o",
        str(tmp_path / "out.cubin"),
        *[f"-I{p}" for p in include_paths()],
        f"-I{cuda / 'include'}",
        str(source),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report, name, spill = {}, None, 0
    for line in done.stderr.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
        elif (m := re.search(r"(\d+) bytes spill stores", line)) and name:
            spill = int(m.group(1))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            report[name] = (int(m.group(1)), spill)
            name = None
    return report


# Mangled template arguments: <float, float, VEC, 3> / <c10::BFloat16, float, VEC, 3> for the
# convolution; the gate kernels add a GRAD_VEC before the class in bwd_conv.
THREE_BY_THREE = re.compile(
    r"(grouped_dwconv_(fwd|bwd)|dwconv_gelu_gate_(fwd|bwd_gate|bwd_conv))_kernel"
    r"I(f|N3c108BFloat16E)f.*Li3EEEv"
)


@pytest.mark.parametrize("source", ["grouped_dwconv.cu", "dwconv_gelu_gate.cu"])
def test_3x3_class_fits_six_blocks_per_sm(source, tmp_path):
    report = _ptxas_report(CSRC / "cuda" / source, tmp_path)
    three = {name: use for name, use in report.items() if THREE_BY_THREE.search(name)}
    assert len(three) >= 4, f"no 3x3-class kernels found in {source}: {sorted(report)}"
    over = {name: use for name, use in three.items() if use[0] > MAX_REGISTERS_3X3}
    assert not over, f"(registers, spill bytes) over {MAX_REGISTERS_3X3} registers: {over}"
    # A few bytes of spill where ptxas trades them for registers; never a spilled loop.
    spilled = {name: use for name, use in three.items() if use[1] > 8}
    assert not spilled, f"3x3-class kernels spilling: {spilled}"
