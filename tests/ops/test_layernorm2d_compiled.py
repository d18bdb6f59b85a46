"""layernorm2d on the compiled kernels (moce_kernels._C): C++ on the CPU, CUDA on the GPU.

Forward and the three gradients against ``layernorm2d_reference``, the ops themselves through
``torch.ops.moce.layernorm2d_fwd`` / ``_bwd`` (statistics, ``opcheck``, bad input), gradcheck,
determinism. Skipped as a whole when the extension is not built.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from moce_kernels import _extension, layernorm2d
from moce_kernels.layernorm2d.reference import layernorm2d_reference
from tests.ops._helpers import (
    DEVICES,
    LAYERNORM_DTYPES,
    LAYOUTS,
    check_layernorm2d,
    misaligned,
    skip_unless_extension_built,
)
from tests.ops._helpers import layernorm_inputs as make_inputs

skip_unless_extension_built()

from moce_kernels.layernorm2d import compiled  # noqa: E402  (needs the extension)
from moce_kernels.layernorm2d.compiled import layernorm2d_compiled  # noqa: E402

SHAPES = [
    pytest.param((1, 3, 13, 21), id="1x3x13x21"),
    pytest.param((2, 48, 7, 5), id="2x48x7x5"),
    pytest.param((3, 1, 1, 1), id="C1-1x1"),
    pytest.param((2, 130, 4, 33), id="2x130x4x33"),
    # H * W a multiple of 8: the CUDA kernels take their 128-bit vector path.
    pytest.param((2, 16, 8, 8), id="2x16x8x8-vec"),
    # More pixels than one CPU task (64) and one CUDA block: several groups / warps / blocks.
    pytest.param((3, 5, 37, 41), id="3x5x37x41"),
    pytest.param((0, 4, 5, 6), id="B0"),
    pytest.param((2, 3, 0, 5), id="HW0"),
]

DTYPES = LAYERNORM_DTYPES


def check_against_reference(x, weight, bias, eps, atol, rtol, backend):
    """Output and the gradients of x, weight and bias of ``backend`` against the reference."""
    check_layernorm2d(lambda *args: layernorm2d(*args, backend=backend), x, weight, bias, eps, atol, rtol)


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, atol, rtol, device):
    check_against_reference(*make_inputs(shape, dtype, device), 1e-5, atol, rtol, backend=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [pytest.param(torch.float32, id="fp32-params")])
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
)
def test_low_precision_input_with_float32_params(dtype, param_dtype, device):
    x, weight, bias = make_inputs((2, 6, 9, 11), dtype, device, param_dtype=param_dtype)
    check_against_reference(x, weight, bias, 1e-5, 2e-2, 1.6e-2, backend=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [pytest.param(1e-6, id="eps1e-6"), pytest.param(1e-2, id="eps1e-2")])
def test_other_eps(eps, device):
    # Few channels and a small spread make eps matter.
    x, weight, bias = make_inputs((2, 3, 5, 7), torch.float32, device)
    check_against_reference(x * 0.05, weight, bias, eps, 1e-5, 1.3e-5, backend=device)


@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_small_spread(device):
    # |mean| = 300 >> std = 0.02: a float32 E[x^2] - E[x]^2 would lose every digit of the
    # variance (and the reference's own float32 mean is off by ~1e-3 std). Against float64 from
    # the same float32 values, the limit being float32's resolution at 300 (3e-5 = 1.5e-3 std).
    x, weight, bias = make_inputs((2, 32, 6, 8), torch.float32, device)
    x = x * 1e-2 + 300.0
    y, mean, rstd = torch.ops.moce.layernorm2d_fwd(x, weight, bias, 1e-5)
    xd = x.double()
    want_rstd = (xd.var(1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(mean.double(), xd.mean(1), atol=3.1e-5, rtol=0)  # one float32 ulp at 300
    torch.testing.assert_close(rstd.double(), want_rstd, atol=0, rtol=1e-4)
    want = layernorm2d_reference(xd, weight.double(), bias.double(), 1e-5)
    torch.testing.assert_close(y.double(), want, atol=5e-3, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_or_misaligned_input(layout, device):
    x, weight, bias = make_inputs((2, 5, 12, 16), torch.float32, device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, 1:-1, ::2]
    else:
        x = misaligned(x)
    check_against_reference(x, weight, bias, 1e-5, 1e-5, 1.3e-5, backend=device)


def test_auto_backend_runs_the_cpu_kernel():
    x, weight, bias = make_inputs((2, 7, 5, 3), torch.float32)
    want = layernorm2d_compiled(x, weight, bias, 1e-5)
    torch.testing.assert_close(layernorm2d(x, weight, bias), want, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_pixel(device):
    x, weight, bias = make_inputs((2, 4, 5, 8), torch.float32, device)
    x[1, 2, 3, 4] = math.nan
    out = layernorm2d(x, weight, bias, backend=device).cpu()
    nan_mask = torch.zeros(out.shape, dtype=torch.bool)
    nan_mask[1, :, 3, 4] = True
    assert bool(out[nan_mask].isnan().all())
    assert bool(out[~nan_mask].isfinite().all())


@pytest.mark.parametrize("device", DEVICES)
def test_constant_pixel_gives_bias(device):
    x = torch.full((1, 4, 2, 3), 3.25, device=device)
    weight, bias = torch.randn(4, device=device), torch.randn(4, device=device)
    out = layernorm2d(x, weight, bias, backend=device)
    torch.testing.assert_close(out, bias.view(1, 4, 1, 1).expand_as(x), atol=0, rtol=0)


# --- the ops themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "stats_dtype"),
    [
        pytest.param(torch.float32, torch.float32, id="fp32"),
        pytest.param(torch.float64, torch.float64, id="fp64"),
        pytest.param(torch.bfloat16, torch.float32, id="bf16"),
        pytest.param(torch.float16, torch.float32, id="fp16"),
    ],
)
def test_fwd_op_statistics(dtype, stats_dtype, device):
    x, weight, bias = make_inputs((2, 9, 5, 7), dtype, device)
    y, mean, rstd = torch.ops.moce.layernorm2d_fwd(x, weight, bias, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert mean.shape == rstd.shape == (2, 5, 7)
    assert mean.dtype == rstd.dtype == stats_dtype
    xs = x.to(stats_dtype)
    tol = 1e-12 if stats_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean, xs.mean(1), atol=tol, rtol=tol)
    torch.testing.assert_close(rstd, (xs.var(1, unbiased=False) + 1e-5).rsqrt(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_op_output_dtypes(device):
    x, weight, _ = make_inputs((2, 6, 3, 5), torch.bfloat16, device, param_dtype=torch.float32)
    _, mean, rstd = torch.ops.moce.layernorm2d_fwd(x, weight, weight, 1e-5)
    grad_x, grad_w, grad_b = torch.ops.moce.layernorm2d_bwd(torch.ones_like(x), x, weight, mean, rstd)
    assert grad_x.dtype == torch.bfloat16 and grad_x.shape == x.shape
    assert grad_w.dtype == grad_b.dtype == torch.float32 and grad_w.shape == grad_b.shape == (6,)
    # grad_bias is the sum of grad_y over batch and pixels.
    torch.testing.assert_close(grad_b, torch.full_like(grad_b, 2 * 3 * 5), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 3, 4, 5), id="2x3x4x5"),
        pytest.param((1, 5, 3, 7), id="1x5x3x7"),
        pytest.param((2, 1, 2, 3), id="C1"),
    ],
)
def test_gradcheck(shape, device):
    x, weight, bias = (t.requires_grad_(True) for t in make_inputs(shape, torch.float64, device))
    assert torch.autograd.gradcheck(lambda a, w, b: layernorm2d(a, w, b, backend=device), (x, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "requires_grad"),
    [
        pytest.param(torch.float32, True, id="fp32-grad"),
        pytest.param(torch.float32, False, id="fp32"),
        pytest.param(torch.float64, True, id="fp64-grad"),
        pytest.param(torch.bfloat16, False, id="bf16"),
    ],
)
def test_opcheck(dtype, requires_grad, device):
    x, weight, bias = make_inputs((2, 6, 5, 8), dtype, device)
    args = [t.requires_grad_(requires_grad) for t in (x, weight, bias)]
    torch.library.opcheck(torch.ops.moce.layernorm2d_fwd.default, (*args, 1e-5))
    y, mean, rstd = torch.ops.moce.layernorm2d_fwd(x.detach(), weight.detach(), bias.detach(), 1e-5)
    grad_y = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.moce.layernorm2d_bwd.default, (grad_y, x.detach(), weight.detach(), mean, rstd)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input_gives_zero_param_grads(device):
    for shape in ((0, 3, 4, 5), (2, 3, 0, 4)):
        x, weight, bias = (t.requires_grad_(True) for t in make_inputs(shape, torch.float32, device))
        out = layernorm2d(x, weight, bias, backend=device)
        assert out.shape == shape
        grad_x, grad_w, grad_b = torch.autograd.grad(out.sum(), (x, weight, bias))
        assert grad_x.shape == shape
        torch.testing.assert_close(grad_w, torch.zeros_like(weight), atol=0, rtol=0)
        torch.testing.assert_close(grad_b, torch.zeros_like(bias), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_backward_is_deterministic(dtype, device):
    x, weight, bias = make_inputs((4, 24, 33, 47), dtype, device)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
        return torch.autograd.grad(layernorm2d(*leaves, backend=device), leaves, grad_out)

    first, second = grads(), grads()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_cpu_param_grads_do_not_depend_on_thread_count():
    x, weight, bias = make_inputs((3, 16, 40, 50), torch.float32)
    _, mean, rstd = torch.ops.moce.layernorm2d_fwd(x, weight, bias, 1e-5)
    grad_y = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.moce.layernorm2d_bwd(grad_y, x, weight, mean, rstd)
        torch.set_num_threads(max(2, threads))
        multi = torch.ops.moce.layernorm2d_bwd(grad_y, x, weight, mean, rstd)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a, b)


def test_double_backward_raises():
    x, weight, bias = (t.requires_grad_(True) for t in make_inputs((1, 3, 2, 2), torch.float64))
    out = layernorm2d(x, weight, bias, backend="cpu")
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    importlib.reload(compiled)  # would raise if the fake / autograd registrations ran twice
    x, weight, bias = (t.requires_grad_(True) for t in make_inputs((1, 3, 2, 2), torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, w, b: compiled.layernorm2d_compiled(a, w, b, 1e-5), (x, weight, bias)
    )


def test_built_with_cuda_is_a_bool():
    assert isinstance(_extension.module().built_with_cuda(), bool)


# --- bad input -------------------------------------------------------------------------------


PUBLIC_BAD_INPUTS = [
    pytest.param(dict(x=torch.randn(2, 3, 4)), ValueError, "x", id="x-3d"),
    pytest.param(dict(x=torch.ones(2, 3, 4, 5, dtype=torch.int32)), TypeError, "x", id="x-int"),
    pytest.param(dict(weight=torch.randn(4)), ValueError, "weight", id="weight-shape"),
    pytest.param(dict(bias=torch.randn(3, 1)), ValueError, "bias", id="bias-2d"),
    pytest.param(dict(eps=0.0), ValueError, "eps", id="eps-0"),
    pytest.param(dict(backend="cuda"), RuntimeError, "needs cuda tensors", id="backend-cuda-on-cpu-tensors"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), PUBLIC_BAD_INPUTS)
def test_public_bad_input_raises(overrides, error, match):
    args = dict(
        x=torch.randn(2, 3, 4, 5), weight=torch.randn(3), bias=torch.randn(3), eps=1e-5, backend="cpu"
    )
    args.update(overrides)
    backend = args.pop("backend")
    with pytest.raises(error, match=match):
        layernorm2d(**args, backend=backend)


OP_BAD_INPUTS = [
    pytest.param(dict(x=torch.randn(2, 3, 4)), "x must be a 4-D", id="x-3d"),
    pytest.param(dict(x=torch.randn(1, 2, 3, 4, 5)), "x must be a 4-D", id="x-5d"),
    pytest.param(dict(x=torch.ones(2, 3, 4, 5, dtype=torch.int32)), "x must be float32", id="x-int"),
    pytest.param(
        dict(x=torch.randn(2, 0, 4, 5), weight=torch.randn(0), bias=torch.randn(0)), "C >= 1", id="C0"
    ),
    pytest.param(dict(weight=torch.randn(4)), r"weight must have shape \[C\] = \[3\]", id="weight-shape"),
    pytest.param(dict(weight=torch.randn(3, 1)), r"weight must have shape \[C\]", id="weight-2d"),
    pytest.param(dict(weight=torch.ones(3, dtype=torch.int64)), "weight must be float32", id="weight-int"),
    pytest.param(dict(bias=torch.randn(2)), r"bias must have shape \[C\]", id="bias-shape"),
    pytest.param(dict(eps=0.0), "eps must be finite and > 0", id="eps-0"),
    pytest.param(dict(eps=math.inf), "eps must be finite and > 0", id="eps-inf"),
]


@pytest.mark.parametrize(("overrides", "match"), OP_BAD_INPUTS)
def test_fwd_op_bad_input_raises(overrides, match):
    args = dict(x=torch.randn(2, 3, 4, 5), weight=torch.randn(3), bias=torch.randn(3), eps=1e-5)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.layernorm2d_fwd(args["x"], args["weight"], args["bias"], args["eps"])


def _bwd_args():
    x, weight, bias = make_inputs((2, 3, 4, 5), torch.float32)
    _, mean, rstd = torch.ops.moce.layernorm2d_fwd(x, weight, bias, 1e-5)
    return dict(grad_y=torch.randn_like(x), x=x, weight=weight, mean=mean, rstd=rstd)


BWD_BAD_INPUTS = [
    pytest.param(dict(grad_y=torch.randn(2, 3, 4, 6)), "grad_y must have the shape of x", id="grad_y-shape"),
    pytest.param(
        dict(grad_y=torch.randn(2, 3, 4, 5).double()), "grad_y must have the dtype of x", id="grad_y-dtype"
    ),
    pytest.param(dict(mean=torch.randn(2, 4)), r"mean must have shape \[B, H, W\]", id="mean-shape"),
    pytest.param(dict(rstd=torch.randn(2, 4, 5).double()), "rstd must have dtype", id="rstd-dtype"),
    pytest.param(dict(weight=torch.randn(5)), r"weight must have shape \[C\]", id="weight-shape"),
]


@pytest.mark.parametrize(("overrides", "match"), BWD_BAD_INPUTS)
def test_bwd_op_bad_input_raises(overrides, match):
    args = _bwd_args()
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.layernorm2d_bwd(args["grad_y"], args["x"], args["weight"], args["mean"], args["rstd"])


@pytest.mark.skipif(_extension.is_built("cuda"), reason="only without usable CUDA kernels")
def test_cuda_backend_without_cuda_kernels_says_why():
    # CPU tensors: the backend check names the device; the kernel check says what is missing.
    with pytest.raises(RuntimeError, match="cuda"):
        layernorm2d(torch.randn(1, 2, 3, 4), torch.randn(2), torch.randn(2), backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        _extension.require("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("param", [pytest.param("weight", id="weight"), pytest.param("bias", id="bias")])
def test_op_param_on_another_device_raises(param):
    args = dict(x=torch.randn(2, 3, 4, 5), weight=torch.randn(3), bias=torch.randn(3))
    args[param] = args[param].to("cuda")
    # The dispatcher picks the CUDA kernel (a CUDA tensor is among the arguments), which refuses.
    with pytest.raises(RuntimeError, match="must be a cuda tensor|must be on the device of x|CUDA"):
        torch.ops.moce.layernorm2d_fwd(args["x"], args["weight"], args["bias"], 1e-5)
