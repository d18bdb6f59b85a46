"""The trunk's PointwiseConv2d (nn.Conv2d's parameters and keys; backend "triton" through
grouped_pointwise, the other backends nn.Conv2d itself) and the timed choices of benchmark mode
(moceir.layers.tuning). The choices' GPU side is in test_tuning_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moceir.layers import tuning
from moceir.layers.conv import PointwiseConv2d
from tests.conftest import needs_triton_on_cpu

needs_triton = needs_triton_on_cpu  # CPU tensors


@pytest.fixture(autouse=True)
def _no_choices():
    tuning.reset()
    yield
    tuning.reset()


@pytest.mark.parametrize("bias", [True, False])
def test_same_parameters_and_keys_as_conv2d(bias):
    conv = nn.Conv2d(6, 10, 1, bias=bias)
    ours = PointwiseConv2d(6, 10, bias=bias)
    assert list(ours.state_dict()) == list(conv.state_dict())
    assert [t.shape for t in ours.state_dict().values()] == [t.shape for t in conv.state_dict().values()]


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_other_backends_run_conv2d_itself(backend):
    torch.manual_seed(0)
    conv = PointwiseConv2d(5, 7)
    conv.backend = backend
    x = torch.randn(2, 5, 6, 3)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias))


SHAPES = [((3, 12, 7, 9), 20, True), ((1, 5, 1, 13), 3, False)]


def _triton(conv, x):
    conv.backend = "triton"
    return conv(x)


def _gemm(conv, x):
    """Benchmark mode's "cublas" candidate: one batched GEMM over the NCHW images, then the bias."""
    return conv._gemm(*conv.autocast_operands(x))


def assert_matches_conv2d_with_gradients(run, shape, c_out, bias):
    """``run(conv, x)`` computes nn.Conv2d's function, gradients of x and the parameters included;
    returns (run's output, nn.Conv2d's)."""
    torch.manual_seed(0)
    conv = PointwiseConv2d(shape[1], c_out, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    params = list(conv.parameters())
    g = torch.randn(shape[0], c_out, *shape[2:])
    want = F.conv2d(x, conv.weight, conv.bias)
    grads_want = torch.autograd.grad(want, [x, *params], g)
    got = run(conv, x)
    grads_got = torch.autograd.grad(got, [x, *params], g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return got, want


def assert_computes_in_the_autocast_dtype(run):
    """Under CPU autocast, ``run(conv, x)`` computes in bfloat16 as nn.Conv2d does there, and the
    float32 parameters get float32 gradients."""
    torch.manual_seed(0)
    conv = PointwiseConv2d(8, 12)
    x = torch.randn(2, 8, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = conv(x)  # "auto" on the CPU: nn.Conv2d under autocast
        got = run(conv, x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)
    got.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and conv.bias.grad.dtype == torch.float32


@needs_triton
@pytest.mark.parametrize(("shape", "c_out", "bias"), SHAPES)
def test_triton_matches_conv2d_with_gradients(shape, c_out, bias):
    assert_matches_conv2d_with_gradients(_triton, shape, c_out, bias)


@pytest.mark.parametrize(("shape", "c_out", "bias"), SHAPES)
def test_gemm_candidate_matches_conv2d_with_gradients(shape, c_out, bias):
    got, want = assert_matches_conv2d_with_gradients(_gemm, shape, c_out, bias)
    assert got.shape == want.shape and got.is_contiguous()


def test_gemm_candidate_under_autocast_computes_in_the_autocast_dtype():
    assert_computes_in_the_autocast_dtype(_gemm)


@needs_triton
def test_triton_under_autocast_computes_in_the_autocast_dtype():
    assert_computes_in_the_autocast_dtype(_triton)


def test_choose_runs_nothing_when_it_cannot_time():
    """A CPU tensor, or benchmark mode off: the default, no candidate called, nothing kept."""
    called = []
    candidates = {"a": lambda: called.append("a"), "b": lambda: called.append("b")}
    x = torch.zeros(1)
    saved = torch.backends.cudnn.benchmark
    try:
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            assert tuning.choose(("k", benchmark), candidates, "b", x) == "b"
    finally:
        torch.backends.cudnn.benchmark = saved
    assert called == [] and tuning.choices() == {}


def test_choose_keeps_the_fastest_per_key(monkeypatch):
    """Timed once per key (each candidate run), then served from the cache until reset."""
    times = {"slow": 3.0, "fast": 1.0, "middle": 2.0}
    runs = []

    def fake_median_ms(call):
        return times[call()]

    monkeypatch.setattr(tuning, "enabled", lambda x: True)
    monkeypatch.setattr(tuning, "_median_ms", fake_median_ms)
    candidates = {name: (lambda name=name: runs.append(name) or name) for name in times}
    x = torch.zeros(1)
    assert tuning.choose("key", candidates, "slow", x) == "fast"
    assert sorted(runs) == sorted(times)
    runs.clear()
    times["slow"] = 0.5  # a later change of speed is not seen: the choice is kept
    assert tuning.choose("key", candidates, "slow", x) == "fast" and runs == []
    assert tuning.choices() == {"key": "fast"}
    tuning.reset()
    assert tuning.choose("key", candidates, "fast", x) == "slow"


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
def test_wrong_input_is_named(backend):
    """A wrong channel count or rank: a clear error, on our kernel's path as on nn.Conv2d's."""
    conv = PointwiseConv2d(4, 6)
    conv.backend = backend
    with pytest.raises(RuntimeError, match="to have 4 channels"):
        conv(torch.randn(2, 5, 3, 3))
    with pytest.raises(RuntimeError, match="4D .batched. input"):
        conv(torch.randn(2, 4, 3, 3, 1))


def test_in_use_only_with_a_choice_or_benchmark_mode(monkeypatch):
    x = torch.zeros(1)
    assert not tuning.in_use(x)  # a CPU tensor, no choice made
    monkeypatch.setitem(tuning._CHOICES, "key", "cudnn")
    assert tuning.in_use(x)
