"""What the machine is, before a device check: Python, torch, Triton, GPU, tools, missing modules.

    python -m benchmarks.preflight [OUT.json]

Prints one JSON object (and writes it to OUT.json): versions, the GPU's name, capability,
multiprocessors and memory, the CUDA compiler and ninja, and the Python modules the tests and
the report need that are not installed. Reads only: changes nothing on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

#: Modules the test suite, the benchmarks and the report import (or use when present).
WANTED = (
    "pytest",
    "hypothesis",
    "numpy",
    "safetensors",
    "skimage",
    "PIL",
    "matplotlib",
    "expecttest",
    "pytest_timeout",
    "xdist",
)


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"error: {e}"
    return (done.stdout or done.stderr).strip()


def machine_info() -> dict:
    import torch  # noqa: PLC0415

    info: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton  # noqa: PLC0415

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
        }
    smi = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu",
            "--format=csv,noheader",
        ]
    )
    info["nvidia_smi"] = smi
    nvcc = _run(["nvcc", "--version"])
    info["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    info["ninja"] = _run(["ninja", "--version"])
    info["missing_modules"] = [m for m in WANTED if importlib.util.find_spec(m) is None]
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = machine_info()
    text = json.dumps(info, indent=1)
    print(text)
    if argv:
        Path(argv[0]).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
