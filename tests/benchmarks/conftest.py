"""The harness tests run single-threaded: on a shared 2-core machine every OpenMP barrier of a
2-thread run can wait for a time slice, which makes small model forwards many times slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
