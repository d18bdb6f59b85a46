"""Backend names shared by every op, how ``"auto"`` resolves, and where implementations live.

An op ``<op>`` (folder ``moce_kernels/<op>/``) has an implementation for a backend when
- "triton": ``moce_kernels/<op>/triton.py`` defines ``<op>_triton``;
- "cpu" / "cuda": ``moce_kernels/<op>/compiled.py`` defines ``<op>_compiled`` (the module
  registers the ``torch.ops.moce`` ops of ``moce_kernels._C``; the tensors' device picks the
  CPU or CUDA kernel) and ``COMPILED_DEVICES`` names the devices it has kernels for.
Each takes the same arguments as the op's reference function, already validated.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch

#: Every backend name an op's ``backend=`` argument accepts.
BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

#: (op, "triton" | "compiled") -> the implementation, filled by :func:`resolve_backend`. A plain
#: dict, so that torch.compile traces :func:`implementation` without importing anything.
_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}


@functools.cache
def triton_usable(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether Triton kernels can run here, and if not, why: on CUDA tensors they need a CUDA GPU,
    on any other device the interpreter (TRITON_INTERPRET=1, set before triton is imported). With
    no ``device``: whether they can run here at all."""
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (pip install triton)"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    kind = None if device is None else torch.device(device).type
    if kind is None:
        if torch.cuda.is_available() or interpreted:
            return True, ""
        return False, "Triton needs a CUDA GPU (or TRITON_INTERPRET=1 set before importing triton: testing)"
    if interpreted:
        return True, ""  # the interpreter runs any tensor (CUDA ones through host copies)
    if kind == "cuda":
        return (True, "") if torch.cuda.is_available() else (False, "Triton needs a CUDA GPU")
    # On a GPU machine too: compiled Triton kernels cannot read host memory (the launch would
    # fail deep inside Triton with a pointer error).
    return False, (
        f"Triton's compiled kernels take CUDA tensors, got {kind} tensors (move them to the GPU, "
        "or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU, slowly, "
        "for testing)"
    )


@functools.cache
def _module(op: str, kind: str):
    name = f"moce_kernels.{op}.{kind}"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


@functools.cache
def _has_file(op: str, kind: str) -> bool:
    return importlib.util.find_spec(f"moce_kernels.{op}.{kind}") is not None


def implemented(op: str) -> set[str]:
    """The non-reference backends whose source exists for ``op`` (built or not)."""
    found = set()
    if _has_file(op, "triton"):
        found.add("triton")
    if _has_file(op, "compiled"):
        found.update(("cpu", "cuda"))
    return found


def _compiled_usable(op: str, device_type: str) -> bool:
    from moce_kernels import _extension  # noqa: PLC0415

    if not (_has_file(op, "compiled") and _extension.is_built(device_type)):
        return False
    devices = getattr(_module(op, "compiled"), "COMPILED_DEVICES", ("cpu", "cuda"))
    return device_type in devices


@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Return the concrete backend to run ``op`` with on ``device``.

    Under torch.compile this runs once, at trace time, and its result is a constant: the
    imports and file lookups it does never break the graph. It also loads the implementation
    so that :func:`implementation` is a dict lookup.

    ``"auto"``: on CUDA the CUDA kernel if built, else Triton, else the reference; on the CPU
    the C++ kernel if built, else the reference. Raises ValueError for an unknown name and
    RuntimeError (saying how to fix it) for a backend not implemented or not usable here.
    """
    chosen = _resolve(op, backend, device)
    if chosen != "reference":
        _load_implementation(op, chosen)
    return chosen


def _resolve(op: str, backend: str, device: torch.device) -> str:
    from moce_kernels import _extension  # noqa: PLC0415

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    have = implemented(op)
    if backend == "auto":
        if _compiled_usable(op, device.type):
            return device.type
        if device.type == "cuda" and "triton" in have and triton_usable(device)[0]:
            return "triton"
        return "reference"
    if backend == "reference":
        return backend
    if backend not in have:
        raise RuntimeError(
            f"{op}: backend {backend!r} is not implemented yet; available: {sorted(have | {'reference'})}"
        )
    if backend == "triton":
        ok, why = triton_usable(device)
        if not ok:
            raise RuntimeError(f"{op}: backend 'triton' cannot run here: {why}")
        return backend
    if device.type != backend:
        raise RuntimeError(f"{op}: backend {backend!r} needs {backend} tensors, got {device}")
    _extension.require(backend)
    if not _compiled_usable(op, backend):
        raise RuntimeError(f"{op}: the compiled module has no {backend} kernel for this op yet")
    return backend


def implementation(op: str, backend: str) -> Callable:
    """The function that runs ``op`` on a ``backend`` that :func:`resolve_backend` returned."""
    found = _IMPLEMENTATIONS.get((op, "triton" if backend == "triton" else "compiled"))
    # Loaded by resolve_backend; tests may call this directly.
    return found if found is not None else _load_implementation(op, backend)


def _load_implementation(op: str, backend: str) -> Callable:
    kind = "triton" if backend == "triton" else "compiled"
    if (op, kind) not in _IMPLEMENTATIONS:
        _IMPLEMENTATIONS[(op, kind)] = getattr(_module(op, kind), f"{op}_{kind}")
    return _IMPLEMENTATIONS[(op, kind)]


def ops() -> list[str]:
    """Every op of the package (its folders that define one)."""
    root = Path(__file__).resolve().parent
    return sorted(d.name for d in root.iterdir() if (d / "reference.py").is_file())


def preload(backend: str, device: torch.device) -> None:
    """Load every op's implementation that ``backend`` may run on ``device`` now, outside any
    torch.compile trace: a trace cannot import a module (Dynamo skips importlib), so a model
    compiled before its first eager call would otherwise break its graph at each first use."""
    for op in ops():
        try:
            resolve_backend(op, op_backend(op, backend), device)
        except RuntimeError:
            continue  # not usable here: the op's call raises its own error


def check_available(backend: str) -> None:
    """Raise RuntimeError (saying why and how to fix it) unless ``backend`` can run here at all.

    For a whole-model choice: the per-op fallback (:func:`op_backend`) handles the ops that have
    no kernel of that backend yet.
    """
    from moce_kernels import _extension  # noqa: PLC0415

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        ok, why = triton_usable()
        if not ok:
            raise RuntimeError(f"backend 'triton' cannot run here: {why}")
    elif backend in ("cpu", "cuda"):
        _extension.require(backend)


def is_available(backend: str) -> bool:
    """Whether :func:`check_available` accepts ``backend`` here (no exception, no reason)."""
    try:
        check_available(backend)
    except RuntimeError:
        return False
    return True


@torch.compiler.assume_constant_result
def op_backend(op: str, backend: str) -> str:
    """The backend ``op`` runs with when a whole model asks for ``backend``: the op's own kernel
    of that backend when it has one, else the reference ("auto" picks per op and device)."""
    if backend in ("auto", "reference") or backend in implemented(op):
        return backend
    return "reference"
