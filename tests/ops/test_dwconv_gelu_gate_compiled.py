"""dwconv_gelu_gate on the compiled kernels (moce_kernels._C): C++ on the CPU, CUDA on the GPU.

Forward and the three gradients against ``dwconv_gelu_gate_reference`` (run in float64 on the
same rounded inputs), the ops themselves through ``torch.ops.moce.dwconv_gelu_gate_fwd`` /
``_bwd`` (``opcheck``, bad input), gradcheck, determinism (run to run, and across CPU thread
counts). Kernel-allocated buffers are NaN-filled by torch (deterministic mode's
``fill_uninitialized_memory``), so an element a kernel forgets to write fails the finiteness
checks. The exact texts of the C++ checks' messages are pinned in test_compiled_messages.py.
Skipped as a whole when the extension is not built.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from moce_kernels import dwconv_gelu_gate
from moce_kernels.dwconv_gelu_gate.reference import dwconv_gelu_gate_reference
from tests.ops._helpers import DEVICES, LAYOUTS, misaligned, skip_unless_extension_built

skip_unless_extension_built()

from moce_kernels.dwconv_gelu_gate import compiled  # noqa: E402  (needs the extension)

# (B, Ch, K, H, W)
CASES = [
    pytest.param((1, 3, 3, 13, 21), id="B1-k3-13x21"),
    pytest.param((2, 2, 5, 13, 21), id="B2-k5-13x21"),
    pytest.param((1, 4, 7, 13, 21), id="B1-k7-13x21"),
    pytest.param((2, 3, 9, 13, 21), id="B2-k9-13x21"),
    pytest.param((1, 3, 3, 1, 1), id="B1-k3-1x1"),
    pytest.param((2, 2, 9, 1, 1), id="B2-k9-1x1"),
    # Smaller than the kernel: zero padding on every side of every output.
    pytest.param((1, 2, 7, 4, 9), id="B1-k7-4x9"),
    # Wider than one CUDA tile (32 x 32) in both directions, W a multiple of 8 (vector path).
    pytest.param((2, 3, 5, 37, 40), id="B2-k5-multi-tile-37x40"),
    # The CUDA kernels' 3 x 3 class (the GDFN's convolution), across tiles.
    pytest.param((2, 3, 3, 37, 40), id="B2-k3-class-multi-tile-37x40"),
]

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
    # One rounding of the float32 result to bf16 / fp16 (eps 7.8e-3 / 9.8e-4).
    pytest.param(torch.bfloat16, 1.6e-2, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]

BIAS = [pytest.param(True, id="bias"), pytest.param(False, id="no-bias")]


def make_case(batch, half, k, height, width, *, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    """x [B, 2 * half, H, W], weight [2 * half, K, K] (a ~ N(0, 1) before the bias), bias [2 * half]."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(batch, 2 * half, height, width, generator=g)
    weight = torch.randn(2 * half, k, k, generator=g) / k
    bias = torch.randn(2 * half, generator=g)
    to = dict(dtype=dtype, device=device)
    return x.to(**to), weight.to(**to), bias.to(**to)


def reference_f64(x, weight, bias, grad_y):
    """Output and gradients (x, weight, bias or None) of the reference in float64, on the CPU."""
    leaves = [
        None if t is None else t.detach().cpu().double().requires_grad_(True) for t in (x, weight, bias)
    ]
    out = dwconv_gelu_gate_reference(*leaves)
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_y.cpu().double())
    return out.detach(), grads


def assert_close_to(got, want, atol, rtol, name):
    assert bool(got.isfinite().all()), f"{name}: NaN/Inf (an element left unwritten?)"
    torch.testing.assert_close(got.cpu().double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def check_against_reference(x, weight, bias, atol, rtol, device):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    out = dwconv_gelu_gate(*leaves, backend=device)
    batch, channels, height, width = x.shape
    assert out.shape == (batch, channels // 2, height, width)
    assert out.dtype == x.dtype and out.device == x.device and out.is_contiguous()
    grad_y = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(x.device)
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_y)
    want, want_grads = reference_f64(x, weight, bias, grad_y)
    assert_close_to(out, want, atol, rtol, "output")
    # Weight and bias gradients sum over B * H * W pixels: atol grows with its square root.
    terms = math.sqrt(max(1, batch * height * width))
    for name, leaf, got, ref, scale in zip(
        ("x", "weight", "bias"), inputs, grads, want_grads, (1, terms, terms), strict=False
    ):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        assert_close_to(got, ref, atol * scale, rtol, f"grad {name}")


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, atol, rtol, with_bias, device):
    x, weight, bias = make_case(*case, dtype=dtype, device=device)
    check_against_reference(x, weight, bias if with_bias else None, atol, rtol, device)


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
def test_large_inputs_reach_both_tails_of_the_gelu(device):
    # a and b up to ~±50: gelu(a) is 0 (to float32) or a, gelu'(a) 0 or 1, and the float32 erfc's
    # exponent goes far below its clamp.
    x, weight, bias = make_case(2, 3, 3, 9, 10, device=device, scale=20.0)
    check_against_reference(x, weight, bias, 1e-4, 1e-5, device)


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_or_misaligned_input(layout, device):
    x, weight, bias = make_case(2, 3, 5, 9, 16, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], -1)[..., ::2]
    else:
        x = misaligned(x)
    check_against_reference(x, weight, bias, 1e-5, 1e-5, device)


@pytest.mark.parametrize("device", DEVICES)
def test_op_kernel_size_1(device):
    # The public function takes kernel sizes 3..9; the op also takes 1 (a per-channel scale).
    x, weight, bias = make_case(2, 3, 1, 5, 6, device=device)
    out = torch.ops.moce.dwconv_gelu_gate_fwd(x, weight, bias)
    want = dwconv_gelu_gate_reference(x.cpu(), weight.cpu(), bias.cpu())
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, weight, bias = make_case(0, 2, 3, 5, 4, device=device)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias)]
    out = dwconv_gelu_gate(*leaves, backend=device)
    assert out.shape == (0, 2, 5, 4)
    grad_x, grad_w, grad_b = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert grad_x.shape == x.shape
    assert not grad_w.any() and not grad_b.any()


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_op_grad_bias_is_zero_without_bias(device):
    x, weight, _ = make_case(2, 3, 5, 6, 7, device=device)
    grad_y = torch.randn(2, 3, 6, 7, device=device)
    grad_x, grad_w, grad_b = torch.ops.moce.dwconv_gelu_gate_bwd(grad_y, x, weight, None)
    assert grad_b.shape == (6,) and grad_b.dtype == weight.dtype
    assert not grad_b.any()
    assert grad_x.shape == x.shape and grad_w.shape == weight.shape
    # Through autograd the bias gets no gradient at all.
    leaves = [t.requires_grad_(True) for t in (x, weight)]
    out = dwconv_gelu_gate(*leaves, None, backend=device)
    got_x, got_w = torch.autograd.grad(out, leaves, grad_y)
    torch.testing.assert_close(got_x, grad_x, atol=0, rtol=0)
    torch.testing.assert_close(got_w, grad_w, atol=0, rtol=0)


def test_auto_backend_runs_the_cpu_kernel():
    x, weight, bias = make_case(1, 3, 3, 6, 7)
    want = compiled.dwconv_gelu_gate_compiled(x, weight, bias)
    got = dwconv_gelu_gate(x, weight, bias)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- the ops themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("case", "with_bias"),
    [
        # 3 x 4 is smaller than the 5 x 5 kernel: zero padding on every side of every output.
        pytest.param((2, 2, 5, 3, 4), True, id="B2-k5-3x4-bias"),
        pytest.param((1, 1, 3, 4, 3), False, id="B1-k3-4x3-no-bias"),
    ],
)
def test_gradcheck(case, with_bias, device):
    x, weight, bias = make_case(*case, dtype=torch.float64, device=device)
    leaves = (x.requires_grad_(True), weight.requires_grad_(True))
    if with_bias:
        leaves += (bias.requires_grad_(True),)
        assert torch.autograd.gradcheck(lambda a, w, b: dwconv_gelu_gate(a, w, b, backend=device), leaves)
    else:
        assert torch.autograd.gradcheck(lambda a, w: dwconv_gelu_gate(a, w, None, backend=device), leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "requires_grad", "with_bias"),
    [
        pytest.param(torch.float32, True, True, id="fp32-grad"),
        pytest.param(torch.float32, True, False, id="fp32-grad-no-bias"),
        pytest.param(torch.float64, True, True, id="fp64-grad"),
        pytest.param(torch.bfloat16, False, True, id="bf16"),
    ],
)
def test_opcheck(dtype, requires_grad, with_bias, device):
    x, weight, bias = make_case(2, 2, 3, 5, 6, dtype=dtype, device=device)
    bias = bias.requires_grad_(requires_grad) if with_bias else None
    args = (x.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), bias)
    torch.library.opcheck(torch.ops.moce.dwconv_gelu_gate_fwd.default, args)
    grad_y = torch.randn(2, 2, 5, 6, dtype=dtype, device=device)
    bwd_bias = None if bias is None else bias.detach()
    torch.library.opcheck(
        torch.ops.moce.dwconv_gelu_gate_bwd.default, (grad_y, x.detach(), weight.detach(), bwd_bias)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_backward_is_deterministic(dtype, device):
    x, weight, bias = make_case(3, 6, 7, 45, 38, dtype=dtype, device=device)
    grad_y = torch.randn(3, 6, 45, 38, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
        out = dwconv_gelu_gate(*leaves, backend=device)
        return torch.autograd.grad(out, leaves, grad_y)

    first, second = grads(), grads()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_cpu_results_do_not_depend_on_thread_count(dtype):
    x, weight, bias = make_case(3, 6, 7, 30, 31, dtype=dtype)
    grad_y = torch.randn(3, 6, 30, 31).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = (torch.ops.moce.dwconv_gelu_gate_fwd(x, weight, bias),) + tuple(
            torch.ops.moce.dwconv_gelu_gate_bwd(grad_y, x, weight, bias)
        )
        torch.set_num_threads(max(2, threads))
        multi = (torch.ops.moce.dwconv_gelu_gate_fwd(x, weight, bias),) + tuple(
            torch.ops.moce.dwconv_gelu_gate_bwd(grad_y, x, weight, bias)
        )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a, b)


def test_double_backward_raises():
    x, weight, bias = make_case(1, 1, 3, 3, 3, dtype=torch.float64)
    x.requires_grad_(True)
    out = dwconv_gelu_gate(x, weight, bias, backend="cpu")
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    importlib.reload(compiled)  # would raise if the fake / autograd registrations ran twice
    x, weight, bias = make_case(1, 1, 3, 3, 3, dtype=torch.float64)
    leaves = tuple(t.requires_grad_(True) for t in (x, weight, bias))
    assert torch.autograd.gradcheck(compiled.dwconv_gelu_gate_compiled, leaves)


# --- bad input (the exact texts: test_compiled_messages.py) -------------------------------------


def _op_args():
    x, weight, bias = make_case(2, 2, 3, 6, 7)
    return dict(x=x, weight=weight, bias=bias)


FWD_BAD_INPUTS = [
    pytest.param(dict(x=torch.randn(4, 6, 7)), "x must be a 4-D", id="x-3d"),
    pytest.param(dict(x=torch.ones(2, 4, 6, 7, dtype=torch.int32)), "x must be float32", id="x-int"),
    pytest.param(
        dict(x=torch.randn(2, 3, 6, 7), weight=torch.randn(3, 3, 3), bias=None),
        "x must have an even channel count",
        id="x-odd-channels",
    ),
    pytest.param(dict(weight=torch.randn(6, 3, 3)), r"weight must have shape \[2 \* Ch, K, K\]", id="w-2ch"),
    pytest.param(dict(weight=torch.randn(4, 3, 5)), r"weight must have shape", id="w-not-square"),
    pytest.param(dict(weight=torch.randn(4, 3, 3, 1)), r"weight must have shape", id="w-4d"),
    pytest.param(dict(weight=torch.randn(4, 4, 4)), "kernel size K must be odd", id="w-even"),
    pytest.param(dict(weight=torch.randn(4, 11, 11)), r"K must be odd, in 1..9, got 11", id="w-11"),
    pytest.param(dict(weight=torch.randn(4, 3, 3).double()), "weight must have the dtype of x", id="w-dtype"),
    pytest.param(dict(bias=torch.randn(2)), r"bias must have shape \[2 \* Ch\] = \[4\]", id="bias-shape"),
    pytest.param(dict(bias=torch.randn(4).half()), "bias must have the dtype of x", id="bias-dtype"),
]


@pytest.mark.parametrize(("overrides", "match"), FWD_BAD_INPUTS)
def test_fwd_op_bad_input_raises(overrides, match):
    args = _op_args()
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.dwconv_gelu_gate_fwd(*args.values())


BWD_BAD_INPUTS = [
    pytest.param(
        dict(grad_y=torch.randn(2, 4, 6, 7)), r"grad_y must have shape \[B, Ch, H, W\]", id="grad_y-shape"
    ),
    pytest.param(
        dict(grad_y=torch.randn(2, 2, 6, 7).double()), "grad_y must have the dtype", id="grad_y-dtype"
    ),
    pytest.param(dict(weight=torch.randn(4, 4, 4)), "kernel size K must be odd", id="w-even"),
    pytest.param(dict(bias=torch.randn(5)), r"bias must have shape", id="bias-shape"),
]


@pytest.mark.parametrize(("overrides", "match"), BWD_BAD_INPUTS)
def test_bwd_op_bad_input_raises(overrides, match):
    args = dict(grad_y=torch.randn(2, 2, 6, 7), **_op_args())
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.dwconv_gelu_gate_bwd(*args.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_op_tensor_on_another_device_raises():
    args = _op_args()
    args["weight"] = args["weight"].cuda()
    with pytest.raises(RuntimeError, match="must be a (cpu|cuda) tensor|must be on the device of x"):
        torch.ops.moce.dwconv_gelu_gate_fwd(*args.values())
    args = {k: v.cuda() for k, v in _op_args().items()}
    args["bias"] = args["bias"].cpu()
    with pytest.raises(RuntimeError, match="must be a (cpu|cuda) tensor|must be on the device of x"):
        torch.ops.moce.dwconv_gelu_gate_fwd(*args.values())
