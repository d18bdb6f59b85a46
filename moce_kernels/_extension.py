"""Loading of the compiled module ``moce_kernels._C`` (C++ CPU kernels, CUDA kernels if built)."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `make build`); "
    "set FORCE_CUDA=1 to compile the CUDA kernels without a visible GPU"
)


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from moce_kernels import _C  # noqa: PLC0415  (registers the ops with torch.library)
    except ImportError as e:  # not built, or built against another torch
        return None, str(e)
    return _C, ""


def module() -> ModuleType | None:
    """The compiled module, or None when it is not built."""
    return _load()[0]


def is_built(kind: str = "cpu") -> bool:
    """Whether the compiled ``kind`` ("cpu" or "cuda") kernels can run in this process."""
    mod = module()
    if mod is None:
        return False
    if kind == "cuda":
        return bool(mod.built_with_cuda()) and torch.cuda.is_available()
    return True


def require(kind: str = "cpu") -> ModuleType:
    """Return the compiled module, or raise RuntimeError saying why it cannot run ``kind``."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(f"moce_kernels._C is not built ({err}); {BUILD_HINT}")
    if kind == "cuda":
        if not mod.built_with_cuda():
            raise RuntimeError(
                "moce_kernels._C was built without CUDA kernels (no CUDA toolchain was found); " + BUILD_HINT
            )
        if not torch.cuda.is_available():
            raise RuntimeError("the cuda backend needs a CUDA GPU, and torch sees none")
    return mod


def build_summary() -> str:
    """One line saying what was built, for the demo and bug reports."""
    mod, err = _load()
    if mod is None:
        return f"moce_kernels._C: not built ({err})"
    kinds = "C++ CPU + CUDA" if mod.built_with_cuda() else "C++ CPU only (no CUDA kernels)"
    return f"moce_kernels._C: {kinds}"
