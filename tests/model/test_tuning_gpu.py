"""Benchmark mode on a GPU: the trunk's 1x1 and depthwise convolutions time our kernels against
cuDNN's (and, for 1x1, a cuBLAS GEMM) once per shape and keep the fastest, and so do its
LayerNorm -> 1x1 and 1x1 -> residual add (fused_pointwise against the unfused layers) and the
attention's 1x1 -> depthwise 3x3 (the two layers against one dense 3x3 convolution); every
choice computes the reference's function, and a CUDA graph captured after the warm-up uses the
choices without timing anything."""

from __future__ import annotations

import pytest
import torch

import moceir
from moceir.layers import tuning

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("exact_fp32"),
]

SMALL = dict(num_blocks=(1, 1, 1, 1), num_dec_blocks=(2, 1, 1), num_refinement_blocks=1)


@pytest.fixture
def benchmark_mode():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    tuning.reset()
    yield
    torch.backends.cudnn.benchmark = saved
    tuning.reset()


def _models() -> tuple[moceir.MoCEIR, moceir.MoCEIR]:
    torch.manual_seed(0)
    ref = moceir.build_model("moce_ir_s", backend="reference", **SMALL)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fast = moceir.build_model("moce_ir_s", backend="auto", **SMALL)
    fast.load_state_dict(ref.state_dict())
    return ref.cuda().eval(), fast.cuda().eval()


def _x(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, 64, 64, device="cuda")


def _never_time(call):
    raise AssertionError("timed a candidate after the choices were made")


def test_benchmark_mode_chooses_once_per_shape_and_matches_reference(benchmark_mode, monkeypatch):
    ref, fast = _models()
    x = _x()
    with torch.no_grad():
        want = ref(x)
        got = fast(x)
        kinds = {key[0] for key in tuning.choices()}
        fusions = {"pointwise-norm", "pointwise-residual", "pointwise-attention"}
        fusions |= {"pointwise-attention-residual"}
        composed = {"pointwise-depthwise", "pointwise-depthwise-norm"}
        tail = "dwconv-gate-pointwise-residual"  # the GDFN after project_in (and the skip)
        assert kinds == {"pointwise", "depthwise", *fusions, *composed, tail}
        names = {"cudnn", "kernel", "triton", "cublas", "fused", "unfused", "separate", "composed"}
        assert set(tuning.choices().values()) <= names
        # Every 1x1 shape timed its three candidates, every depthwise one its two or three, every
        # LayerNorm -> 1x1, 1x1 -> skip and attention -> project_out the fused kernel against the
        # unfused layers.
        for key, times in tuning.timings().items():
            assert all(ms > 0 for ms in times.values()), key
            if key[0] in fusions:
                assert set(times) == {"fused", "unfused"}, key
                continue
            if key[0] in composed:  # qkv -> qkv_dwconv (and q -> q_dwconv) as one 3x3 convolution
                assert set(times) == {"separate", "composed"}, key
                continue
            if key[0] == tail:
                assert set(times) == {"separate", "fused"}, key
                continue
            assert set(times) >= {"cudnn", "kernel"}, key
            if key[0] == "pointwise":
                assert "cublas" in times, key
        monkeypatch.setattr(tuning, "_median_ms", _never_time)
        again = fast(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, got)  # same choices (cuDNN's algorithms may add atomics)


@pytest.mark.parametrize("forced", ["kernel", "cudnn", "triton", "cublas", "fused", "composed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_either_choice_computes_the_reference_with_gradients(forced, dtype, benchmark_mode, monkeypatch):
    # Where a layer has no such candidate (a 1x1 convolution has no "triton" one, a depthwise
    # one no "cublas" one, only the trunk's fusions into its 1x1 convolutions and the GDFN's tail
    # a "fused" one, only the attention's 1x1 -> depthwise 3x3 pairs a "composed" one), its
    # default. Benchmark mode is
    # on (the layers offer their candidates only then); nothing is timed.
    offered = []

    def choose(key, candidates, default, x):
        offered.append(forced in candidates)
        return forced if forced in candidates else default

    monkeypatch.setattr(tuning, "choose", choose)
    ref, fast = _models()
    x = _x()
    outs = []
    for model in (ref, fast):
        model.train()
        torch.manual_seed(2)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(x)
        grads = torch.autograd.grad(out.float().square().mean(), list(model.parameters()), allow_unused=True)
        outs.append((out.float(), grads))
    assert any(offered), f"no layer offered {forced!r}: the test would check nothing"
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(outs[1][0], outs[0][0], **tol)
    for (name, p), g_fast, g_ref in zip(fast.named_parameters(), outs[1][1], outs[0][1], strict=True):
        g_fast = torch.zeros_like(p) if g_fast is None else g_fast  # noqa: PLW2901
        g_ref = torch.zeros_like(p) if g_ref is None else g_ref  # noqa: PLW2901
        scale = g_ref.abs().max().item() + 1e-6
        torch.testing.assert_close(g_fast.float() / scale, g_ref.float() / scale, msg=name, **tol)


def test_a_graph_captured_after_the_warm_up_times_nothing(benchmark_mode, monkeypatch):
    ref, fast = _models()
    x = _x(1)
    graphed = moceir.GraphedInference(fast, x)  # the warm-up chooses
    chosen = tuning.choices()
    assert chosen
    monkeypatch.setattr(tuning, "_median_ms", _never_time)
    with torch.no_grad():
        torch.testing.assert_close(graphed(x), ref(x), atol=1e-4, rtol=1e-4)
    assert tuning.choices() == chosen


def test_without_benchmark_mode_nothing_is_timed(monkeypatch):
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    tuning.reset()
    monkeypatch.setattr(tuning, "_median_ms", _never_time)
    try:
        _, fast = _models()
        with torch.no_grad():
            fast(_x())
        assert tuning.choices() == {}
    finally:
        torch.backends.cudnn.benchmark = saved
