"""Build of the compiled module ``moce_kernels._C`` (C++ CPU kernels, CUDA kernels when possible).

    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

The C++ CPU sources are always built. The CUDA sources are built when a CUDA toolkit is found
(and torch is a CUDA build), or when FORCE_CUDA=1 (then a missing toolkit is an error);
FORCE_CUDA=0 builds the CPU kernels only. Environment:

    CUDA_HOME / CUDA_PATH   the CUDA toolkit (else torch's guess, else /usr/local/cuda)
    TORCH_CUDA_ARCH_LIST    GPU architectures, default "8.0;8.6;8.9;9.0+PTX"
    MAX_JOBS                parallel compile jobs (ninja)

torch is imported here, so it must already be installed: keep it out of build isolation.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # pragma: no cover - depends on the environment
    sys.exit(
        f"moce: building moce_kernels._C needs torch installed first ({e}); "
        "then run `pip install --no-build-isolation -e .`"
    )

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def log(msg: str) -> None:
    print(f"moce setup: {msg}", flush=True)


def _is_cuda_toolkit(path: str | os.PathLike | None) -> bool:
    """A toolkit we can compile and link with: nvcc, cuda_runtime.h and libcudart."""
    if not path:
        return False
    root = Path(path)
    lib_dirs = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    has_cudart = any(any((root / d).glob("libcudart*")) for d in lib_dirs if (root / d).is_dir())
    return (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists() and has_cudart


def _nvcc_wrapper_target(nvcc: str) -> Path | None:
    """The toolkit a wrapper script `nvcc` execs (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`)."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = re.search(rb"(/[^\s\"']+)/bin/nvcc\b", head)
    return Path(match.group(1).decode()) if match else None


def find_cuda_home() -> str | None:
    """The CUDA toolkit root to build with, or None.

    CUDA_HOME / CUDA_PATH win when set. Otherwise torch's guess, unless it lacks the runtime
    headers or library (torch guesses /usr/local when `nvcc` on PATH is a wrapper script in
    /usr/local/bin), then the toolkit such a wrapper points at, then /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates: list[Path] = []
    if cpp_extension.CUDA_HOME:
        candidates.append(Path(cpp_extension.CUDA_HOME))
    nvcc = shutil.which("nvcc")
    if nvcc:
        wrapped = _nvcc_wrapper_target(nvcc)
        if wrapped is not None:
            candidates.append(wrapped)
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for candidate in candidates:
        if _is_cuda_toolkit(candidate):
            return str(candidate.resolve())
    return None


def want_cuda() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and the CUDA toolkit root when so."""
    force = os.environ.get("FORCE_CUDA", "").strip()
    if force == "0":
        log("FORCE_CUDA=0: building the C++ CPU kernels only")
        return False, ""
    if torch.version.cuda is None:
        if force == "1":
            sys.exit(f"moce setup: FORCE_CUDA=1, but torch {torch.__version__} is not a CUDA build")
        log(f"torch {torch.__version__} is not a CUDA build: building the C++ CPU kernels only")
        return False, ""
    cuda_home = find_cuda_home()
    if cuda_home is None or not _is_cuda_toolkit(cuda_home):
        if force == "1":
            sys.exit(
                f"moce setup: FORCE_CUDA=1, but no usable CUDA toolkit was found (tried {cuda_home!r}; "
                "it needs bin/nvcc, include/cuda_runtime.h and lib64/libcudart*): set CUDA_HOME"
            )
        tried = f"{cuda_home} is not a usable CUDA toolkit" if cuda_home else "no CUDA toolkit found"
        log(f"{tried} (set CUDA_HOME to one): building the C++ CPU kernels only")
        return False, ""
    return True, cuda_home


def extensions() -> list:
    with_cuda, cuda_home = want_cuda()
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    # Every C++ file in csrc/ (one per op, plus module.cpp); every .cu in csrc/cuda/.
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    define_macros: list[tuple[str, str | None]] = []
    if not with_cuda:
        log("building moce_kernels._C: C++ CPU kernels only (no CUDA kernels)")
        return [
            cpp_extension.CppExtension(
                "moce_kernels._C",
                sources,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
            )
        ]

    # cpp_extension reads its module-level CUDA_HOME when it builds, so point it at the toolkit.
    cpp_extension.CUDA_HOME = cuda_home
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
    define_macros.append(("MOCE_WITH_CUDA", None))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    log(
        f"building moce_kernels._C: C++ CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
    )
    return [
        cpp_extension.CUDAExtension(
            "moce_kernels._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


class BuildExt(cpp_extension.BuildExtension):
    """BuildExtension with a fixed object folder, build/temp.<platform>-<python>.

    `pip install -e .` would otherwise compile in a fresh temporary folder every time; keeping
    the objects and ninja's log in one place makes rebuilds incremental (only changed sources
    and the sources including changed headers are recompiled).
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = str(
            ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        )


log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(unset: ninja picks)')}")
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
