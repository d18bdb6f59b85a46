"""Fixtures of the csrc tests."""

from __future__ import annotations

import pytest

from tests.csrc._emulation import Emulated, build


@pytest.fixture(scope="session")
def emulated(tmp_path_factory) -> Emulated:
    """csrc/cuda's kernels compiled for the CPU against the CUDA shim (tests/csrc/_emulation.py)."""
    return build(tmp_path_factory.mktemp("cuda_emulation"))
