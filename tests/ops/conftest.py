"""Fixtures of the op tests (helpers in tests/ops/_helpers.py)."""

from __future__ import annotations

import pytest

from tests.ops._helpers import compile_for_sm90, nan_filled_torch_empty


@pytest.fixture
def nan_filled_empty():
    """Every torch.empty (also those the kernels allocate) comes back NaN-filled."""
    with nan_filled_torch_empty():
        yield


@pytest.fixture(scope="module")
def sm90_results(request):
    """The ahead-of-time sm_90 compile of the test module's ``AOT_SPECS`` (see compile_for_sm90)."""
    return compile_for_sm90(request.module.AOT_SPECS)
