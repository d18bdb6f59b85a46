"""benchmarks/sanitizer_workload.py: its comparisons pass for a correct backend, catch a wrong one,
and the script says it needs a GPU without one."""

from __future__ import annotations

import pytest
import torch

from benchmarks import sanitizer_workload
from moce_kernels import layernorm2d
from moce_kernels._backend import is_available


@pytest.mark.skipif(not is_available("cpu"), reason="moce_kernels._C is not built")
def test_cpu_kernels_pass_every_comparison():
    failures: list[str] = []
    sanitizer_workload.check("cpu", torch.device("cpu"), failures)
    assert failures == []


def test_a_wrong_output_is_reported():
    def off_by_one_percent(x, w, b, backend):
        return layernorm2d(x, w, b, backend="reference") * (1.0 if backend == "reference" else 1.01)

    failures: list[str] = []
    inputs = [torch.randn(2, 5, 4, 4), torch.randn(5), torch.randn(5)]
    sanitizer_workload._compare("ln", off_by_one_percent, inputs, "cpu", (1e-5, 1e-5, 1e-5, 1e-5), failures)
    assert failures and failures[0].startswith("cpu ln:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert sanitizer_workload.main([]) == 3
    assert "needs a CUDA GPU" in capsys.readouterr().out
