"""A guard on the launch grids of moce_kernels' Triton kernels, installed for the whole test run
by tests/conftest.py.

CUDA allows 2**31 - 1 programs on a grid's first dimension but only 65535 on the second and
third. A second "rows" or "chunks" axis passes that on large images or batches (an 8K image's
pixel blocks, over 65535 routed rows) and the launch then fails on the GPU, which CPU tests at
small sizes never see. So every kernel here numbers its programs on a 1-d grid, and any launch
of one with a longer grid fails the test that made it, whatever its size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

PACKAGE = "moce_kernels"


def kernel_name(kernel) -> str:
    """``module.function`` of a Triton kernel (a JIT or interpreted function)."""
    fn = getattr(kernel, "fn", kernel)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(kernel).__name__)}"


def check_grid(kernel, grid) -> None:
    """AssertionError for a moce_kernels kernel launched on a grid of more than one dimension."""
    name = kernel_name(kernel)
    if not name.startswith(PACKAGE + "."):
        return
    dims = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    if len(dims) != 1:
        raise AssertionError(
            f"{name} launched on the grid {dims}: moce_kernels' Triton kernels use 1-d grids "
            "(CUDA caps the second and third grid dimensions at 65535; see tests/_launch_grids.py)"
        )


@contextlib.contextmanager
def one_dimensional_grids() -> Iterator[None]:
    """Check every ``kernel[grid]`` launch (a grid given as a function is checked when Triton
    calls it) while the context is open."""
    from triton.runtime.jit import KernelInterface  # noqa: PLC0415 - only once the interpreter is set

    original = KernelInterface.__getitem__

    def checked(self, grid):
        if not callable(grid):
            check_grid(self, grid)
            return original(self, grid)

        def checked_grid(meta):
            dims = grid(meta)
            check_grid(self, dims)
            return dims

        return original(self, checked_grid)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KernelInterface, "__getitem__", checked)
        yield
