"""dwconv_gelu_gate (reference backend): against the GDFN written out in float64 (``F.conv2d`` with
groups = 2 * Ch, chunk, ``F.gelu``), forward and every gradient; kernel sizes 3..9, with and
without bias, every float dtype, odd H x W, B = 0; argument validation with messages that name the
argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moce_kernels.dwconv_gelu_gate import dwconv_gelu_gate

# (B, Ch, H, W, K)
SHAPES = [
    pytest.param((2, 3, 13, 21, 3), id="k3-13x21"),
    pytest.param((1, 5, 7, 6, 5), id="k5-B1"),
    pytest.param((2, 2, 9, 11, 7), id="k7"),
    pytest.param((1, 1, 1, 1, 9), id="k9-1x1"),
    pytest.param((3, 4, 2, 13, 9), id="k9-wider-than-the-image"),
]

# (dtype, atol, rtol): the expectation is float64 math on the same (rounded) values; the op
# computes in float32 (float64 for float64) and rounds its result once to the dtype.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
    pytest.param(torch.bfloat16, 1.6e-2, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]


def make_inputs(batch, gate, height, width, k, *, dtype=torch.float32, bias=True, seed=0):
    """x [B, 2 * Ch, H, W], weight [2 * Ch, K, K] (scaled by 1 / K: outputs O(1)), bias [2 * Ch]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2 * gate, height, width, generator=g).to(dtype)
    weight = (torch.randn(2 * gate, k, k, generator=g) / k).to(dtype)
    b = torch.randn(2 * gate, generator=g).to(dtype) if bias else None
    return x, weight, b


def gdfn_float64(x, weight, bias):
    """The GDFN's middle as the model writes it, in float64: depthwise conv, chunk, gelu * gate."""
    channels, k = weight.shape[0], weight.shape[-1]
    bias = None if bias is None else bias.double()
    y = F.conv2d(x.double(), weight.double().unsqueeze(1), bias, padding=k // 2, groups=channels)
    x1, x2 = y.chunk(2, dim=1)
    return F.gelu(x1) * x2


def forward_and_grads(fn, x, weight, bias, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    out = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def assert_matches_float64(x, weight, bias, atol, rtol):
    out_shape = (x.shape[0], x.shape[1] // 2, *x.shape[2:])
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    out, grads = forward_and_grads(
        lambda *a: dwconv_gelu_gate(*a, backend="reference"), x, weight, bias, grad_out
    )
    want, want_grads = forward_and_grads(gdfn_float64, x, weight, bias, grad_out)
    assert out.dtype == x.dtype and tuple(out.shape) == out_shape
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    # Weight and bias gradients sum over B * H * W terms: their atol grows with its square root.
    terms = max(1, x.shape[0] * x.shape[2] * x.shape[3]) ** 0.5
    for name, got, ref, scale in zip(
        ("x", "weight", "bias"), grads, want_grads, (1, terms, terms), strict=False
    ):
        assert got.dtype == x.dtype, name
        torch.testing.assert_close(
            got.double(), ref.double(), atol=atol * scale, rtol=rtol, msg=f"grad {name}"
        )


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_gdfn_in_float64(shape, dtype, atol, rtol):
    assert_matches_float64(*make_inputs(*shape, dtype=dtype), atol, rtol)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_without_bias(shape):
    assert_matches_float64(*make_inputs(*shape, bias=False), 1e-5, 1e-5)


def test_float32_is_the_unfused_module_code():
    # In float32 the reference is the model's own unfused GDFN middle (nn.Conv2d, chunk, gelu *
    # gate): what FeedForward keeps with backend="reference".
    x, weight, bias = make_inputs(2, 3, 8, 9, 3)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
    with torch.no_grad():
        conv.weight.copy_(weight.unsqueeze(1))
        conv.bias.copy_(bias)
    x1, x2 = conv(x).chunk(2, dim=1)
    torch.testing.assert_close(dwconv_gelu_gate(x, weight, bias, backend="reference"), F.gelu(x1) * x2)


def test_empty_batch():
    x, weight, bias = make_inputs(0, 3, 5, 6, 3)
    x.requires_grad_(True)
    out = dwconv_gelu_gate(x, weight, bias, backend="reference")
    assert out.shape == (0, 3, 5, 6)
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    assert grad_x.shape == x.shape


def test_auto_on_the_cpu_matches_the_reference():
    x, weight, bias = make_inputs(1, 2, 5, 4, 3)
    torch.testing.assert_close(
        dwconv_gelu_gate(x, weight, bias), dwconv_gelu_gate(x, weight, bias, backend="reference")
    )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck(bias):
    x, weight, b = make_inputs(2, 2, 4, 5, 3, dtype=torch.float64, bias=bias)
    leaves = [t.requires_grad_(True) for t in (x, weight, b) if t is not None]

    def fn(*args):
        return dwconv_gelu_gate(args[0], args[1], args[2] if bias else None, backend="reference")

    assert torch.autograd.gradcheck(fn, leaves)


# --- bad input -------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param(dict(x=torch.randn(2, 6, 5)), ValueError, "x must have 4 dimensions", id="x-3d"),
    pytest.param(
        dict(x=torch.ones(2, 6, 5, 5, dtype=torch.int64)), TypeError, "x must have dtype", id="x-int"
    ),
    pytest.param(dict(x=[[[[0.0]]]]), TypeError, "x must be a torch.Tensor", id="x-not-tensor"),
    pytest.param(
        dict(x=torch.randn(2, 5, 5, 5), weight=torch.randn(5, 3, 3), bias=torch.randn(5)),
        ValueError,
        "x must have an even channel count",
        id="odd-channels",
    ),
    pytest.param(dict(weight=torch.randn(6, 4, 4)), ValueError, "kernel size.*got 4", id="kernel-even"),
    pytest.param(dict(weight=torch.randn(6, 1, 1)), ValueError, "kernel size.*got 1", id="kernel-1"),
    pytest.param(dict(weight=torch.randn(6, 11, 11)), ValueError, "kernel size.*got 11", id="kernel-11"),
    pytest.param(
        dict(weight=torch.randn(6, 3, 5)), ValueError, "weight must have shape", id="weight-not-square"
    ),
    pytest.param(
        dict(weight=torch.randn(4, 3, 3)), ValueError, "weight must have shape", id="weight-channels"
    ),
    pytest.param(dict(weight=torch.randn(6, 1, 3, 3)), ValueError, "weight must have 3 dim", id="weight-4d"),
    pytest.param(
        dict(weight=torch.randn(6, 3, 3, dtype=torch.float64)),
        TypeError,
        "weight must have dtype",
        id="weight-dtype",
    ),
    pytest.param(
        dict(weight=torch.randn(6, 3, 3, device="meta")),
        ValueError,
        "weight must be on cpu",
        id="weight-device",
    ),
    pytest.param(dict(bias=torch.randn(5)), ValueError, "bias must have shape", id="bias-shape"),
    pytest.param(dict(bias=torch.randn(2, 3)), ValueError, "bias must have 1 dim", id="bias-2d"),
    pytest.param(
        dict(bias=torch.randn(6, dtype=torch.bfloat16)), TypeError, "bias must have dtype", id="bias-dtype"
    ),
    pytest.param(
        dict(bias=torch.randn(6, device="meta")), ValueError, "bias must be on cpu", id="bias-device"
    ),
    pytest.param(dict(backend="fast"), ValueError, "backend must be one of", id="backend-unknown"),
    pytest.param(dict(backend="cuda"), RuntimeError, "cuda", id="backend-cuda-on-cpu-tensors"),
]


def _valid_args():
    return dict(
        x=torch.randn(2, 6, 5, 5), weight=torch.randn(6, 3, 3), bias=torch.randn(6), backend="reference"
    )


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_INPUTS)
def test_bad_input_raises(overrides, error, match):
    args = _valid_args()
    args.update(overrides)
    backend = args.pop("backend")
    with pytest.raises(error, match=match):
        dwconv_gelu_gate(**args, backend=backend)


def test_valid_args_pass():
    # The base of every bad-input case is itself valid, so each case fails for its own reason.
    args = _valid_args()
    backend = args.pop("backend")
    assert dwconv_gelu_gate(**args, backend=backend).shape == (2, 3, 5, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
@pytest.mark.parametrize("param", [pytest.param("weight", id="weight"), pytest.param("bias", id="bias")])
def test_param_on_another_device_raises(param):
    args = _valid_args()
    args[param] = args[param].to("cuda")
    with pytest.raises(ValueError, match=f"{param} must be on"):
        dwconv_gelu_gate(**args)


# --- property --------------------------------------------------------------------------------


@st.composite
def _gate_case(draw):
    return dict(
        batch=draw(st.integers(1, 3)),
        gate=draw(st.integers(1, 4)),
        height=draw(st.integers(1, 9)),
        width=draw(st.integers(1, 9)),
        k=draw(st.sampled_from([3, 5, 7, 9])),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=20, deadline=None)
@given(case=_gate_case())
def test_property_matches_the_gdfn_in_float64(case):
    shape = [case[k] for k in ("batch", "gate", "height", "width", "k")]
    assert_matches_float64(*make_inputs(*shape, bias=case["bias"], seed=case["seed"]), 1e-5, 1e-5)
