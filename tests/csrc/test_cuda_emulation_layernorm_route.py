"""The CUDA kernels of layernorm2d and route, run on the CPU (see tests/csrc/_emulation.py).

layernorm2d against the reference (forward, statistics, and every gradient through autograd);
route against the C++ CPU kernels of the same op contract (moce::route_fwd / route_bwd on CPU
tensors), which tests/ops holds to the reference: the same gates, experts and probabilities, the
same sort of slots by expert (ties between equal probabilities included), the same gradients.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from moce_kernels.layernorm2d.reference import layernorm2d_reference
from tests.csrc._emulation import DTYPE_CODE, Guarded, close, close_sums, i64
from tests.ops._helpers import skip_unless_extension_built

# (B, C, H, W): N = H * W a multiple of 8 (16-byte path in both dtypes) or not, one channel, more
# pixels than one block of threads, a last warp only partly used.
LAYERNORM_CASES = [
    pytest.param(2, 5, 9, 16, id="B2-C5-9x16"),
    pytest.param(1, 3, 7, 9, id="B1-C3-7x9"),
    pytest.param(2, 1, 4, 8, id="C1"),
    pytest.param(3, 4, 20, 33, id="B3-C4-20x33"),
    # The staged kernels' widths (forward up to 32, 64, 96 channels, backward up to 32, 48) and
    # past them (the other kernels).
    pytest.param(2, 40, 3, 16, id="C40-staged-64"),
    pytest.param(1, 96, 2, 8, id="C96-staged-96"),
    pytest.param(1, 100, 2, 8, id="C100-not-staged"),
]


@pytest.mark.parametrize("scalar", [False, True], ids=["vectors", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("batch", "channels", "height", "width"), LAYERNORM_CASES)
def test_layernorm2d_kernels(emulated, batch, channels, height, width, dtype, scalar):
    g = torch.Generator().manual_seed(3)
    # An offset mean: the kernels' shifted sums must not cancel.
    x = (torch.randn(batch, channels, height, width, generator=g) * 2 + 5).to(dtype)
    weight = torch.randn(channels, generator=g)
    bias = torch.randn(channels, generator=g)
    grad_y = torch.randn(x.shape, generator=g).to(dtype)
    eps = 1e-5

    xr, wr, br = x.float().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    want = layernorm2d_reference(xr, wr, br, eps)
    want.backward(grad_y.float())
    xf = x.float()
    want_mean = xf.mean(1)
    want_rstd = torch.rsqrt(xf.var(1, unbiased=False) + eps)

    f32, code = torch.float32, DTYPE_CODE[dtype]
    dims = (i64(batch), i64(channels), i64(height * width))
    gx, gy = Guarded(x.shape, dtype, x), Guarded(x.shape, dtype, grad_y)
    gw, gb = Guarded((channels,), f32, weight), Guarded((channels,), f32, bias)

    def forward(global_only: int):
        """(y, mean, rstd) of the .cu's choice of kernel, or of the one reading x twice."""
        outs = Guarded(x.shape, dtype), Guarded(want_mean.shape, f32), Guarded(want_rstd.shape, f32)
        emulated.layernorm2d_fwd(
            code,
            gx.ptr,
            gw.ptr,
            gb.ptr,
            *dims,
            ctypes.c_float(eps),
            *(t.ptr for t in outs),
            int(scalar),
            global_only,
        )
        return outs

    def backward(mean, rstd, global_only: int):
        """(grad x, grad weight, grad bias), as forward chooses its kernel."""
        grads = Guarded(x.shape, dtype), Guarded((channels,), f32), Guarded((channels,), f32)
        emulated.layernorm2d_bwd(
            code,
            gy.ptr,
            gx.ptr,
            gw.ptr,
            mean.ptr,
            rstd.ptr,
            *dims,
            *(t.ptr for t in grads),
            int(scalar),
            global_only,
        )
        return grads

    y, mean, rstd = forward(0)
    close(y.check("y"), want, dtype, "y")
    close(mean.check("mean"), want_mean, f32, "mean")
    close(rstd.check("rstd"), want_rstd, f32, "rstd")
    # The staged forward (shared memory) and the one reading x twice: the same bits.
    for a, b, name in zip(forward(1), (y, mean, rstd), ("y", "mean", "rstd"), strict=True):
        assert torch.equal(a.check(name), b.tensor), f"{name}: the two forward kernels differ"

    grad_x, grad_w, grad_b = grads = backward(mean, rstd, 0)
    close(grad_x.check("grad_x"), xr.grad, dtype, "grad_x")
    # Sums over every pixel (bf16 inputs, float32 sums).
    close_sums(grad_w.check("grad_w"), wr.grad, dtype, "grad_w")
    close_sums(grad_b.check("grad_b"), br.grad, dtype, "grad_b")
    # The staged backward (shared memory) and the one reading x and grad y twice: the same bits.
    for a, b, name in zip(backward(mean, rstd, 1), grads, ("grad_x", "grad_w", "grad_b"), strict=True):
        assert torch.equal(a.check(name), b.tensor), f"{name}: the two backward kernels differ"


# (B, E, k, noise, ties): slots past one chunk of the rank kernel's 1024 threads (B * k > 1024),
# equal probabilities (ties broken by the expert index), one image, no images at all.
ROUTE_CASES = [
    pytest.param(5, 4, 2, True, False, id="B5-E4-k2-noise"),
    pytest.param(1, 3, 1, False, False, id="B1-E3-k1"),
    pytest.param(7, 6, 6, True, False, id="k-equals-E"),
    pytest.param(6, 5, 2, False, True, id="ties"),
    pytest.param(600, 9, 2, True, False, id="S1200-two-rank-chunks"),
    pytest.param(0, 4, 2, False, False, id="B0"),
]


@pytest.mark.parametrize(("batch", "experts", "k", "noise", "ties"), ROUTE_CASES)
def test_route_kernels(emulated, batch, experts, k, noise, ties):
    skip_unless_extension_built()
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(batch, experts, generator=g)
    if ties:
        logits = logits.round()  # several equal logits per row
    eps = torch.randn(batch, experts, generator=g) if noise else None
    want = torch.ops.moce.route_fwd(logits, eps, k)  # the C++ CPU kernels

    s = batch * k
    f32, i64t = torch.float32, torch.int64
    shapes = [
        ((batch, k), f32),
        ((batch, k), i64t),
        ((batch, experts), f32),
        ((batch, experts), f32),
        ((experts,), i64t),
        ((experts + 1,), i64t),
        ((s,), i64t),
        ((s,), i64t),
        ((s,), i64t),
    ]
    names = [
        "gates",
        "experts",
        "probs",
        "noisy",
        "counts",
        "offsets",
        "sorted_slots",
        "sorted_images",
        "inverse",
    ]
    outs = [Guarded(shape, dtype) for shape, dtype in shapes]
    g_logits = Guarded(logits.shape, f32, logits)
    g_noise = Guarded(logits.shape, f32, eps) if noise else None
    status = emulated.route_fwd(
        g_logits.ptr, g_noise.ptr if noise else None, i64(batch), i64(experts), i64(k), *(o.ptr for o in outs)
    )
    assert status == 0
    for out, ref, name in zip(outs, want, names, strict=True):
        got = out.check(name)
        if ref.is_floating_point():
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(got, ref), f"{name}: {got} != {ref}"

    # Backward, with each incoming gradient given or not.
    _, experts_idx, probs, noisy = want[:4]
    grads = [
        torch.randn(batch, k, generator=g),
        torch.randn(batch, experts, generator=g),
        torch.randn(batch, experts, generator=g),
    ]
    for present in [(True, True, True), (True, False, False), (False, True, True)]:
        given = [t if p else None for t, p in zip(grads, present, strict=True)]
        want_bwd = torch.ops.moce.route_bwd(noisy, probs, experts_idx, *given)
        g_in = [Guarded(t.shape, f32, t) if t is not None else None for t in given]
        g_noisy, g_probs = Guarded(noisy.shape, f32, noisy), Guarded(probs.shape, f32, probs)
        g_experts = Guarded(experts_idx.shape, i64t, experts_idx)
        out_noisy, out_logits = Guarded(noisy.shape, f32), Guarded(noisy.shape, f32)
        emulated.route_bwd(
            g_noisy.ptr,
            g_probs.ptr,
            g_experts.ptr,
            *(t.ptr if t else None for t in g_in),
            i64(batch),
            i64(experts),
            i64(k),
            out_noisy.ptr,
            out_logits.ptr,
        )
        for got, ref, name in (
            (out_noisy, want_bwd[0], "grad_noisy"),
            (out_logits, want_bwd[1], "grad_logits"),
        ):
            torch.testing.assert_close(got.check(name), ref, rtol=1e-6, atol=1e-7, msg=f"{name} {present}")
