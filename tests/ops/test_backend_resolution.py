"""Where the Triton backend can run (``_backend.triton_usable``) and the error an op gives when it
cannot: compiled Triton kernels take CUDA tensors only, so on a GPU machine without the
interpreter a CPU tensor must be refused by name before any launch (Triton itself would fail
deep in the launch with a pointer error). The GPU machine is simulated: ``torch.cuda.is_available``
patched, the interpreter switched off for ``triton_usable`` only."""

from __future__ import annotations

import pytest
import torch

from moce_kernels import _backend, layernorm2d


@pytest.fixture
def machine(monkeypatch):
    """``machine(gpu, interpreter)``: what triton_usable sees (its answers are cached per
    process: cleared here and after the test)."""

    def set_(gpu: bool, interpreter: bool) -> None:
        _backend.triton_usable.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        if interpreter:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    yield set_
    _backend.triton_usable.cache_clear()


@pytest.fixture(autouse=True)
def _needs_triton_installed():
    if not _backend.triton_usable()[0] and "not installed" in _backend.triton_usable()[1]:
        pytest.skip("Triton is not installed")


@pytest.mark.parametrize(
    "gpu, interpreter, device, usable, why",
    [
        (True, False, "cuda", True, ""),
        (True, False, "cpu", False, "take CUDA tensors, got cpu tensors"),
        (True, False, None, True, ""),
        (False, False, "cpu", False, "TRITON_INTERPRET=1"),
        (False, False, "cuda", False, "needs a CUDA GPU"),
        (False, False, None, False, "needs a CUDA GPU"),
        (False, True, "cpu", True, ""),
        (True, True, "cpu", True, ""),
        (True, True, torch.device("cuda", 0), True, ""),
    ],
)
def test_triton_usable_per_device(machine, gpu, interpreter, device, usable, why):
    machine(gpu, interpreter)
    got, reason = _backend.triton_usable(device)
    assert got == usable
    assert why in reason
    assert (reason == "") == usable


def test_cpu_tensors_on_a_gpu_machine_are_refused_by_name(machine):
    machine(gpu=True, interpreter=False)
    refused = r"layernorm2d: backend 'triton' cannot run here: .*got cpu tensors"
    with pytest.raises(RuntimeError, match=refused):
        _backend.resolve_backend("layernorm2d", "triton", torch.device("cpu"))
    # The public op validates, then resolves: the error comes before any Triton launch.
    x, w = torch.rand(1, 4, 3, 3), torch.ones(4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layernorm2d(x, w, torch.zeros(4), backend="triton")
    # "auto" never picks Triton for CPU tensors.
    assert _backend.resolve_backend("layernorm2d", "auto", torch.device("cpu")) in ("cpu", "reference")
