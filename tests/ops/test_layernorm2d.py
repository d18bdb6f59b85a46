"""layernorm2d (reference backend): against F.layer_norm on x.permute(0, 2, 3, 1), permuted back."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moce_kernels import layernorm2d
from tests.ops._helpers import assert_close_scaled
from tests.ops._helpers import layernorm_inputs as make_inputs

SHAPES = [
    pytest.param((2, 4, 13, 21), id="2x4x13x21"),
    pytest.param((1, 3, 37, 53), id="1x3x37x53"),
    pytest.param((2, 5, 1, 1), id="2x5x1x1"),
    pytest.param((3, 1, 4, 5), id="C1"),
    pytest.param((2, 48, 8, 8), id="2x48x8x8"),
]

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1.3e-5, id="fp32"),
    # One rounding of the float32 result to bf16 / fp16 (eps 7.8e-3 / 9.8e-4), outputs O(1..4).
    pytest.param(torch.bfloat16, 3e-2, 1.6e-2, id="bf16"),
    pytest.param(torch.float16, 4e-3, 2e-3, id="fp16"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
]


def layer_norm_nchw(x, weight, bias, eps):
    """F.layer_norm over the channel axis of NCHW via a permute to NHWC and back."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


def check_forward_and_grads(x, weight, bias, eps, *, atol, rtol):
    """Output and the gradients of x, weight, bias against F.layer_norm in float64.

    The float64 expectation is taken from the same (possibly rounded) input values. Rounding in
    the op's float32 arithmetic is amplified by 1 / std of a pixel in the output and by
    1 / std**2 in the gradient of x (pixels whose channels nearly agree), so ``atol`` is scaled
    per pixel by max(1, rstd) and max(1, rstd)**2; the weight and bias gradients sum over
    B * H * W pixels, so theirs grows with its square root.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    out = layernorm2d(*leaves, eps, backend="reference")
    want = layer_norm_nchw(*ref_leaves, eps)
    assert out.dtype == x.dtype and out.shape == x.shape
    rstd = (x.double().var(1, keepdim=True, unbiased=False) + eps).rsqrt().clamp(min=1)  # [B, 1, H, W]
    assert_close_scaled(out.double(), want.detach(), atol=atol, rtol=rtol, scale=rstd, name="output")

    grad_out = torch.randn(x.shape).to(x.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    want_grads = torch.autograd.grad(want, ref_leaves, grad_out.double())
    root_pixels = math.sqrt(max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    for name, leaf, got, ref, scale in zip(
        ("x", "weight", "bias"), leaves, grads, want_grads, (rstd**2, root_pixels, root_pixels), strict=True
    ):
        assert got.dtype == leaf.dtype, name
        assert_close_scaled(got.double(), ref, atol=atol, rtol=rtol, scale=scale, name=f"grad {name}")


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm2d_matches_f_layer_norm(shape, dtype, atol, rtol):
    check_forward_and_grads(*make_inputs(shape, dtype), 1e-5, atol=atol, rtol=rtol)


@pytest.mark.parametrize("eps", [pytest.param(1e-6, id="eps1e-6"), pytest.param(1e-2, id="eps1e-2")])
def test_other_eps(eps):
    # A small channel count and a small spread make eps matter.
    x, weight, bias = make_inputs((2, 3, 5, 7), torch.float32)
    check_forward_and_grads(x * 0.05, weight, bias, eps, atol=1e-5, rtol=1.3e-5)


def test_constant_pixel_gives_bias():
    # Zero variance: (x - mean) is 0 at every channel, so the output is exactly the bias.
    x = torch.full((1, 4, 2, 3), 3.25)
    weight, bias = torch.randn(4), torch.randn(4)
    out = layernorm2d(x, weight, bias, backend="reference")
    torch.testing.assert_close(out, bias.view(1, 4, 1, 1).expand_as(x), atol=0, rtol=0)


def test_low_precision_input_with_float32_params():
    x, weight, bias = make_inputs((2, 6, 9, 11), torch.bfloat16)
    check_forward_and_grads(x, weight.float(), bias.float(), 1e-5, atol=3e-2, rtol=1.6e-2)


@pytest.mark.parametrize(
    "layout",
    [pytest.param("channels_last", id="channels-last"), pytest.param("sliced", id="sliced")],
)
def test_non_contiguous_input(layout):
    x, weight, bias = make_inputs((2, 5, 13, 21), torch.float32)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x[:, :, 1:-1, ::2]
    assert not x.is_contiguous()
    check_forward_and_grads(x, weight, bias, 1e-5, atol=1e-5, rtol=1.3e-5)


def test_nan_stays_in_its_pixel():
    x, weight, bias = make_inputs((2, 4, 5, 6), torch.float32)
    x[1, 2, 3, 4] = math.nan
    out = layernorm2d(x, weight, bias, backend="reference")
    nan_mask = torch.zeros(out.shape, dtype=torch.bool)
    nan_mask[1, :, 3, 4] = True
    assert bool(out[nan_mask].isnan().all())
    clean = x.clone()
    clean[1, :, 3, 4] = 0.0
    torch.testing.assert_close(out[~nan_mask], layer_norm_nchw(clean, weight, bias, 1e-5)[~nan_mask])


# torch.var warns about "degrees of freedom <= 0" on a tensor with no elements.
@pytest.mark.filterwarnings("ignore:var\\(\\):UserWarning")
def test_empty_batch():
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    weight = torch.randn(3, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    out = layernorm2d(x, weight, bias, backend="reference")
    assert out.shape == (0, 3, 4, 5)
    grad_x, grad_w, grad_b = torch.autograd.grad(out.sum(), (x, weight, bias))
    assert grad_x.shape == (0, 3, 4, 5)
    torch.testing.assert_close(grad_w, torch.zeros(3), atol=0, rtol=0)
    torch.testing.assert_close(grad_b, torch.zeros(3), atol=0, rtol=0)


@pytest.mark.parametrize(
    "shape", [pytest.param((2, 3, 4, 5), id="2x3x4x5"), pytest.param((1, 1, 2, 3), id="C1")]
)
def test_gradcheck(shape):
    x, weight, bias = (t.requires_grad_(True) for t in make_inputs(shape, torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, w, b: layernorm2d(a, w, b, backend="reference"), (x, weight, bias)
    )


# --- bad input -------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param(dict(x=torch.randn(2, 3, 4)), ValueError, "x", id="x-3d"),
    pytest.param(dict(x=torch.randn(1, 2, 3, 4, 5)), ValueError, "x", id="x-5d"),
    pytest.param(dict(x=torch.ones(2, 3, 4, 5, dtype=torch.int64)), TypeError, "x", id="x-int"),
    pytest.param(dict(x=[[[[0.0]]]]), TypeError, "x", id="x-not-tensor"),
    pytest.param(dict(weight=torch.randn(4)), ValueError, "weight", id="weight-shape"),
    pytest.param(dict(weight=torch.randn(3, 1)), ValueError, "weight", id="weight-2d"),
    pytest.param(dict(weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight", id="weight-int"),
    pytest.param(dict(bias=torch.randn(2)), ValueError, "bias", id="bias-shape"),
    pytest.param(dict(bias=None), TypeError, "bias", id="bias-none"),
    pytest.param(dict(eps=0.0), ValueError, "eps", id="eps-0"),
    pytest.param(dict(eps=-1e-5), ValueError, "eps", id="eps-negative"),
    pytest.param(dict(eps=math.nan), ValueError, "eps", id="eps-nan"),
    pytest.param(dict(backend="fast"), ValueError, "backend", id="backend-unknown"),
    pytest.param(dict(backend="cuda"), RuntimeError, "cuda", id="backend-cuda-on-cpu-tensors"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_INPUTS)
def test_bad_input_raises(overrides, error, match):
    args = dict(
        x=torch.randn(2, 3, 4, 5), weight=torch.randn(3), bias=torch.randn(3), eps=1e-5, backend="reference"
    )
    args.update(overrides)
    backend = args.pop("backend")
    with pytest.raises(error, match=match):
        layernorm2d(**args, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
@pytest.mark.parametrize("param", [pytest.param("weight", id="weight"), pytest.param("bias", id="bias")])
def test_param_on_another_device_raises(param):
    args = dict(x=torch.randn(2, 3, 4, 5), weight=torch.randn(3), bias=torch.randn(3))
    args[param] = args[param].to("cuda")
    with pytest.raises(ValueError, match=param):
        layernorm2d(**args, backend="reference")


# --- property --------------------------------------------------------------------------------


@st.composite
def _layernorm_case(draw):
    return dict(
        shape=(
            draw(st.integers(1, 3)),
            draw(st.integers(1, 9)),
            draw(st.integers(1, 9)),
            draw(st.integers(1, 9)),
        ),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=25, deadline=None)
@given(case=_layernorm_case())
def test_property_layernorm2d_matches_f_layer_norm(case):
    check_forward_and_grads(
        *make_inputs(case["shape"], torch.float32, seed=case["seed"]), 1e-5, atol=1e-5, rtol=1.3e-5
    )
