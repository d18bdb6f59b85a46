"""The channel attention with its L2 normalisation folded onto the small (C/heads)^2 map: the
official function (forward and every gradient), with the map from torch ops or from
``moce_kernels.channel_attention_map``'s kernels, taken by the fast backends only, never where
float16 could overflow."""

from __future__ import annotations

import pytest
import torch

import moceir
from moce_kernels._backend import triton_usable
from moceir.layers import attention
from moceir.layers.attention import Attention, CrossAttention, can_fold_norms, channel_attention


def _inputs(dtype=torch.float64, b=2, c=12, h=7, w=9, heads=3):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, c, h, w, dtype=dtype, requires_grad=True) for _ in range(3))
    t = (torch.rand(heads, 1, 1, dtype=dtype) + 0.5).requires_grad_()
    return q, k, v, heads, t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_folded_attention_is_the_official_function(dtype):
    args = _inputs(dtype)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    outs = []
    for fold in (False, True):
        y = channel_attention(*args, fold_norms=fold)
        grads = torch.autograd.grad(y, [args[0], args[1], args[2], args[4]], torch.ones_like(y))
        outs.append((y, *grads))
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_folded_attention_keeps_normalize_eps_for_an_all_zero_row():
    q, k, v, heads, t = _inputs()
    with torch.no_grad():
        q[0, :4] = 0  # head 0 of image 0: |q| = 0, F.normalize divides by eps
    for fold in (False, True):
        assert torch.isfinite(channel_attention(q, k, v, heads, t, fold_norms=fold)).all()
    torch.testing.assert_close(
        channel_attention(q, k, v, heads, t, fold_norms=True), channel_attention(q, k, v, heads, t)
    )


def test_folded_attention_gradcheck():
    q, k, v, heads, t = _inputs(b=1, c=4, h=3, w=5, heads=2)
    assert torch.autograd.gradcheck(lambda *a: channel_attention(*a, heads, t, fold_norms=True), (q, k, v))


def test_who_folds():
    x32, x16 = torch.zeros(1), torch.zeros(1, dtype=torch.float16)
    assert not can_fold_norms("reference", x32)
    assert can_fold_norms("cpu", x32) and can_fold_norms("auto", x32.double())
    assert can_fold_norms("auto", x32.bfloat16())
    assert not can_fold_norms("auto", x16)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not can_fold_norms("auto", x32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert can_fold_norms("auto", x32)


@pytest.fixture
def folds(monkeypatch):
    """The fold_norms of every attention map the modules compute."""
    seen: list[bool] = []
    real = attention.channel_attention_map

    def recording(*args, **kwargs):
        seen.append(args[4] if len(args) > 4 else kwargs.get("fold_norms", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "channel_attention_map", recording)
    return seen


def test_the_model_folds_with_fast_backends_only(folds):
    model = moceir.build_model("moce_ir_s", backend="reference", num_blocks=(1, 1, 1, 1),
                               num_dec_blocks=(1, 1, 1), num_refinement_blocks=1)  # fmt: skip
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        assert folds and not any(folds)
        folds.clear()
        got = model.set_backend("auto")(x)
    assert folds and all(folds)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_modules_fold_from_their_convolution_backend(folds):
    torch.manual_seed(0)
    x, y = torch.rand(1, 8, 5, 6), torch.rand(1, 8, 5, 6)
    for module, call in (
        (Attention(8, 2, True), lambda m: m(x)),
        (CrossAttention(8, 2, True), lambda m: m(x, y)),
    ):
        for backend, want in (("reference", False), ("auto", True)):
            for m in module.modules():
                if hasattr(m, "backend"):
                    m.backend = backend
            folds.clear()
            call(module)
            assert folds == [want]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_folded_attention_on_the_map_kernels_is_the_official_function(dtype):
    """backend "triton" (the interpreter here): the map from moce_kernels.channel_attention_map."""
    usable, why = triton_usable("cpu")
    if not usable:
        pytest.skip(why)
    args = _inputs(dtype, c=40, h=9, w=31, heads=2)  # 20 rows per head, 279 pixels: masked tiles
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    outs = []
    for fold, backend in ((False, "reference"), (True, "triton")):
        y = channel_attention(*args, fold_norms=fold, backend=backend)
        grads = torch.autograd.grad(y, [args[0], args[1], args[2], args[4]], torch.ones_like(y))
        outs.append((y, *grads))
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_who_uses_the_map_kernels(monkeypatch):
    """The modules pass their backend on; the map's kernels run only where
    moce_kernels.channel_attention_map has them."""
    calls = []
    real = attention.fused_attention_map
    monkeypatch.setattr(
        attention, "fused_attention_map", lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw)
    )
    x = torch.rand(1, 8, 5, 6)
    module = Attention(8, 2, True)
    for backend in ("reference", "cpu", "auto"):  # on the CPU: no gram kernel
        for m in module.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        calls.clear()
        module(x)
        assert calls == [], backend
    if triton_usable("cpu")[0]:
        for m in module.modules():
            if hasattr(m, "backend"):
                m.backend = "triton"
        calls.clear()
        module(x)
        assert calls == ["triton"]


def test_map_kernel_path_in_a_bf16_model_returns_bf16():
    """A model cast to bf16 (no autocast): the float32 map goes back to v's dtype for attn @ v."""
    usable, why = triton_usable("cpu")
    if not usable:
        pytest.skip(why)
    q, k, v, heads, t = _inputs(torch.float32, c=8, h=5, w=7, heads=2)
    q, k, v, t = (a.detach() for a in (q, k, v, t))
    want = channel_attention(q, k, v, heads, t)
    got = channel_attention(*(a.bfloat16() for a in (q, k, v)), heads, t.bfloat16(), True, "triton")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
