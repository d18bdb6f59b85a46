"""Launch grids: every Triton kernel of moce_kernels numbers its programs on a 1-d grid.

CUDA caps a grid's second and third dimensions at 65535, which a rows or chunks axis passes on
large inputs (``dispatch`` / ``combine`` rows of over 268M elements, ``qk_gram``'s backward at 8K).
The kernels read only ``program_id(0)``; the launchers pass 1-d grids (checked on every launch of
the test run by tests/_launch_grids.py, whose guard is tested here too).
"""

from __future__ import annotations

import ast
import math
import pathlib

import pytest
import torch

import moce_kernels
from moce_kernels.dispatch import triton as dispatch_triton
from tests._launch_grids import check_grid, one_dimensional_grids
from tests.conftest import needs_triton_on_cpu

PACKAGE_DIR = pathlib.Path(moce_kernels.__file__).parent
GRID_QUERIES = ("program_id", "num_programs")


def _triton_sources() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "import triton" in p.read_text())


def _grid_axis_reads(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, source) of every ``tl.program_id`` / ``tl.num_programs`` call in the file."""
    tree = ast.parse(path.read_text())
    return [
        (node.lineno, ast.unparse(node))
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in GRID_QUERIES
    ]


def test_the_source_scan_finds_the_kernels():
    # The scan below must see the Triton bindings, or it would pass on nothing.
    sources = {p.relative_to(PACKAGE_DIR).as_posix() for p in _triton_sources()}
    assert {"dispatch/triton.py", "combine/triton.py", "qk_gram/triton.py", "_triton_common.py"} <= sources
    assert sum(len(_grid_axis_reads(p)) for p in _triton_sources()) >= 15


@pytest.mark.parametrize("path", _triton_sources(), ids=lambda p: p.relative_to(PACKAGE_DIR).as_posix())
def test_kernels_read_only_the_first_grid_axis(path):
    others = [
        f"{path.name}:{line}: {source}"
        for line, source in _grid_axis_reads(path)
        if source.split("(", 1)[1].rstrip(")").strip() != "0"
    ]
    assert others == [], "kernels must use a 1-d grid (CUDA caps axes 1 and 2 at 65535)"


class _Kernel:
    """Stands for a Triton kernel of the given module (the guard reads ``fn.__module__``)."""

    def __init__(self, module: str):
        def kernel():
            pass

        kernel.__module__, kernel.__qualname__ = module, "kernel"
        self.fn = kernel


@pytest.mark.parametrize("grid", [(1, 1), (4, 2, 1), [3, 70000]])
def test_guard_rejects_a_grid_of_more_than_one_dimension(grid):
    with pytest.raises(AssertionError, match=r"moce_kernels\.dispatch\.triton\.kernel launched on the grid"):
        check_grid(_Kernel("moce_kernels.dispatch.triton"), grid)


def test_guard_accepts_1d_grids_and_other_packages():
    check_grid(_Kernel("moce_kernels.combine.triton"), (2**31 - 1,))
    check_grid(_Kernel("moce_kernels.combine.triton"), 7)
    check_grid(_Kernel("torch._inductor.kernel"), (4, 4))  # not ours


def test_guard_catches_a_real_launch():
    # Through Triton's own ``kernel[grid]`` (the guard is on for the whole session already; a
    # nested one checks the same). A tuple grid is refused before anything runs.
    with one_dimensional_grids(), pytest.raises(AssertionError, match="dispatch_fwd_kernel launched on"):
        dispatch_triton.dispatch_fwd_kernel[(1, 1)]


@needs_triton_on_cpu
def test_guard_catches_a_grid_function():
    # A grid given as a function is checked when Triton evaluates it, at the launch.
    x, out = torch.zeros(1, 4), torch.full((1, 4), math.nan)
    images = torch.zeros(1, dtype=torch.int64)
    launch = dispatch_triton.dispatch_fwd_kernel[lambda meta: (1, 2)]
    with pytest.raises(AssertionError, match="dispatch_fwd_kernel launched on the grid \\(1, 2\\)"):
        launch(x, images, out, 1, 4, 1, IS_FLOAT=True, BLOCK_F=16)
    # The same launch on a 1-d grid runs.
    dispatch_triton.dispatch_fwd_kernel[lambda meta: (1,)](x, images, out, 1, 4, 1, IS_FLOAT=True, BLOCK_F=16)
    assert torch.equal(out, x)
