"""Backend names shared by every op, and how ``"auto"`` resolves."""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Every backend name an op's ``backend=`` argument accepts.
BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")


def resolve_backend(op: str, backend: str, device: torch.device, implemented: Iterable[str]) -> str:
    """Return the concrete backend to run ``op`` with.

    ``implemented`` lists the non-reference backends this op has. ``"auto"`` picks the compiled
    kernel of the tensors' device when it is implemented and built, else the reference.
    Raises ValueError for an unknown name and RuntimeError (saying how to fix it) for a backend
    that is not implemented or not usable here.
    """
    from moce_kernels import _extension

    implemented = set(implemented)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        native = "cuda" if device.type == "cuda" else "cpu"
        if native in implemented and _extension.is_built(native):
            return native
        return "reference"
    if backend == "reference":
        return backend
    if backend not in implemented:
        raise RuntimeError(
            f"{op}: backend {backend!r} is not implemented yet; "
            f"available: {sorted(implemented | {'reference'})}"
        )
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise RuntimeError(f"{op}: backend {backend!r} needs {backend} tensors, got {device}")
        _extension.require(backend)
    return backend
