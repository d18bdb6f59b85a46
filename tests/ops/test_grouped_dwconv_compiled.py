"""grouped_dwconv on the compiled kernels (moce_kernels._C): C++ on the CPU, CUDA on the GPU.

Forward and the three gradients against ``grouped_dwconv_reference`` (run in float64 on the same
rounded inputs), the ops themselves through ``torch.ops.moce.grouped_dwconv_fwd`` / ``_bwd``
(``opcheck``, bad input), gradcheck, determinism. Kernel-allocated buffers are NaN-filled by
torch (deterministic mode's ``fill_uninitialized_memory``), so an element a kernel forgets to
write fails the finiteness checks. Skipped as a whole when the extension is not built.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import grouped_dwconv
from moce_kernels.grouped_dwconv.reference import grouped_dwconv_reference, pack_dwconv_weights
from tests.ops._helpers import DEVICES, LAYOUTS, NEEDS_CUDA, misaligned, skip_unless_extension_built

skip_unless_extension_built()

from moce_kernels.grouped_dwconv import compiled  # noqa: E402  (needs the extension)

# (channels, kernel_sizes, rows per expert, H, W)
CASES = [
    pytest.param(((3, 5, 16, 7), (3, 5, 7, 9), (2, 0, 3, 1), 13, 21), id="k3579-empty1-13x21"),
    pytest.param(((5, 3, 16, 1), (9, 7, 5, 3), (1, 2, 0, 2), 1, 1), id="k9753-1x1"),
    pytest.param(((4, 8, 16), (3, 5, 7), (0, 0, 3), 8, 8), id="all-rows-on-last-expert-8x8"),
    pytest.param(((2, 5, 3), (5, 9, 3), (0, 4, 0), 7, 3), id="first-and-last-empty"),
    pytest.param(((16,), (3,), (1,), 6, 5), id="E1-B1"),
    # Wider than one CUDA tile (32 x 32) in both directions, W a multiple of 8 (vector path).
    pytest.param(((3, 6), (7, 5), (1, 2), 37, 40), id="multi-tile-37x40"),
    # The CUDA kernels' 3 x 3 class (the trunk's convolutions), across tiles.
    pytest.param(((6,), (3,), (2,), 37, 40), id="k3-class-multi-tile-37x40"),
    pytest.param(((2, 3), (3, 9), (1, 1), 4, 9), id="k3-and-k9-4x9"),
]

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
    # One rounding of the float32 result to bf16 / fp16 (eps 7.8e-3 / 9.8e-4).
    pytest.param(torch.bfloat16, 1.6e-2, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]


def make_case(channels, kernel_sizes, counts, height, width, *, dtype=torch.float32, device="cpu", seed=0):
    """Packed weight [E, C_max, K_max, K_max], bias [E, C_max], x with garbage in unused channels."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(c, 1, k, k, generator=g) / k for c, k in zip(channels, kernel_sizes, strict=True)]
    biases = [torch.randn(c, generator=g) for c in channels]
    weight, bias, chans, ks = pack_dwconv_weights(weights, biases)
    x = 10 * torch.randn(sum(counts), max(channels), height, width, generator=g)
    row = 0
    for c, n in zip(channels, counts, strict=True):
        x[row : row + n, :c] = torch.randn(n, c, height, width, generator=g)
        row += n
    offsets = torch.tensor([0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()])
    to = dict(dtype=dtype, device=device)
    return x.to(**to), weight.to(**to), bias.to(**to), offsets.to(device), chans, ks


def reference_f64(x, weight, bias, offsets, channels, kernel_sizes, grad_y):
    """Output and (grad x, grad weight, grad bias) of the reference in float64, on the CPU."""
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, weight, bias)]
    out = grouped_dwconv_reference(*leaves, offsets.tolist(), channels, kernel_sizes)
    grads = torch.autograd.grad(out, leaves, grad_y.cpu().double())
    return out.detach(), grads


def assert_close_to(got, want, atol, rtol, name):
    assert bool(got.isfinite().all()), f"{name}: NaN/Inf (an element left unwritten?)"
    torch.testing.assert_close(got.cpu().double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def check_against_reference(x, weight, bias, offsets, channels, kernel_sizes, atol, rtol, device):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    out = grouped_dwconv(*leaves, offsets, channels, kernel_sizes, backend=device)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(x.device)
    grads = torch.autograd.grad(out, leaves, grad_y)
    want, want_grads = reference_f64(x, weight, bias, offsets, channels, kernel_sizes, grad_y)
    assert_close_to(out, want, atol, rtol, "output")
    # Weight and bias gradients sum over rows * H * W pixels: atol grows with its square root.
    terms = math.sqrt(max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    for name, leaf, got, ref, scale in zip(
        ("x", "weight", "bias"), leaves, grads, want_grads, (1, terms, terms), strict=True
    ):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        assert_close_to(got, ref, atol * scale, rtol, f"grad {name}")
    offs = offsets.tolist()
    for e, c in enumerate(channels):
        # Channels past C_e: exactly zero in the output and in x's gradient.
        assert bool((out[offs[e] : offs[e + 1], c:] == 0).all())
        assert bool((grads[0][offs[e] : offs[e + 1], c:] == 0).all())


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, atol, rtol, device):
    check_against_reference(*make_case(*case, dtype=dtype, device=device), atol, rtol, device)


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
def test_without_bias(device):
    x, weight, _, offsets, chans, ks = make_case((3, 5), (3, 9), (2, 1), 13, 21, device=device)
    out = grouped_dwconv(x, weight, None, offsets, chans, ks, backend=device)
    want = grouped_dwconv_reference(x.cpu(), weight.cpu(), None, offsets.tolist(), chans, ks)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_offsets(device):
    x, weight, bias, offsets, chans, ks = make_case((3, 5), (5, 3), (2, 1), 6, 7, device=device)
    want = grouped_dwconv(x, weight, bias, offsets, chans, ks, backend=device)
    got = grouped_dwconv(x, weight, bias, offsets.int(), chans, ks, backend=device)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_or_misaligned_input(layout, device):
    x, weight, bias, offsets, chans, ks = make_case((3, 6), (7, 5), (1, 2), 9, 16, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], -1)[..., ::2]
    else:
        x = misaligned(x)
    check_against_reference(x, weight, bias, offsets, chans, ks, 1e-5, 1e-5, device)


@pytest.mark.parametrize("device", DEVICES)
def test_no_rows_at_all(device):
    x, weight, bias, offsets, chans, ks = make_case((3, 5), (3, 7), (0, 0), 5, 4, device=device)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias)]
    out = grouped_dwconv(*leaves, offsets, chans, ks, backend=device)
    assert out.shape == (0, 5, 5, 4)
    grad_x, grad_w, grad_b = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert grad_x.shape == x.shape
    assert not grad_w.any() and not grad_b.any()


@pytest.mark.parametrize("device", DEVICES)
def test_weight_outside_each_kernel_is_ignored_and_gets_no_gradient(device):
    # K_max = 11 (a wider window than any expert's kernel) filled with garbage outside the kernels.
    x, weight, bias, offsets, chans, ks = make_case((3, 5, 4), (3, 7, 5), (2, 1, 2), 9, 11, device=device)
    wide = F.pad(weight, (2, 2, 2, 2))
    inside = torch.zeros_like(wide, dtype=torch.bool)
    for e, (c, k) in enumerate(zip(chans, ks, strict=True)):
        lo = (wide.shape[-1] - k) // 2
        inside[e, :c, lo : lo + k, lo : lo + k] = True
    garbage = torch.where(inside, wide, torch.full_like(wide, 1e3)).requires_grad_(True)
    garbage_bias = bias.clone()
    for e, c in enumerate(chans):
        garbage_bias[e, c:] = 1e3
    garbage_bias.requires_grad_(True)
    out = grouped_dwconv(x, garbage, garbage_bias, offsets, chans, ks, backend=device)
    want = grouped_dwconv(x, weight, bias, offsets, chans, ks, backend=device)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grad_w, grad_b = torch.autograd.grad(out, (garbage, garbage_bias), torch.randn_like(out))
    assert bool((grad_w[~inside] == 0).all()) and bool((grad_w[inside] != 0).any())
    for e, c in enumerate(chans):
        assert bool((grad_b[e, c:] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_op_kernel_size_1(device):
    # The public function takes kernel sizes 3..9; the op also takes 1 (a per-channel scale).
    x, weight, bias, offsets, chans, ks = make_case((2, 3), (1, 5), (2, 1), 5, 6, device=device)
    out = torch.ops.moce.grouped_dwconv_fwd(x, weight, bias, offsets, chans, ks)
    want = grouped_dwconv_reference(x.cpu(), weight.cpu(), bias.cpu(), offsets.tolist(), chans, ks)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


def test_auto_backend_runs_the_cpu_kernel():
    x, weight, bias, offsets, chans, ks = make_case((3, 5), (3, 5), (2, 1), 6, 7)
    want = compiled.grouped_dwconv_compiled(x, weight, bias, offsets, chans, ks)
    got = grouped_dwconv(x, weight, bias, offsets, chans, ks)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- the ops themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("channels", "kernel_sizes", "counts"),
    [
        pytest.param((1, 2), (3, 5), (1, 2), id="two-experts"),
        pytest.param((1, 2, 2), (5, 3, 3), (1, 0, 1), id="middle-expert-empty"),
    ],
)
def test_gradcheck(channels, kernel_sizes, counts, device):
    # 3 x 4 is smaller than the 5 x 5 kernel: zero padding on every side of every output.
    x, weight, bias, offsets, chans, ks = make_case(
        channels, kernel_sizes, counts, 3, 4, dtype=torch.float64, device=device
    )
    leaves = tuple(t.requires_grad_(True) for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda a, w, b: grouped_dwconv(a, w, b, offsets, chans, ks, backend=device), leaves
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "requires_grad", "with_bias"),
    [
        pytest.param(torch.float32, True, True, id="fp32-grad"),
        pytest.param(torch.float32, False, False, id="fp32-no-bias"),
        pytest.param(torch.float64, True, True, id="fp64-grad"),
        pytest.param(torch.bfloat16, False, True, id="bf16"),
    ],
)
def test_opcheck(dtype, requires_grad, with_bias, device):
    x, weight, bias, offsets, chans, ks = make_case((2, 4), (3, 5), (1, 2), 5, 6, dtype=dtype, device=device)
    bias = bias.requires_grad_(requires_grad) if with_bias else None
    args = (x.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), bias, offsets, chans, ks)
    torch.library.opcheck(torch.ops.moce.grouped_dwconv_fwd.default, args)
    grad_y = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.moce.grouped_dwconv_bwd.default, (grad_y, x.detach(), weight.detach(), offsets, chans, ks)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_backward_is_deterministic(dtype, device):
    x, weight, bias, offsets, chans, ks = make_case(
        (6, 12), (3, 7), (3, 2), 45, 38, dtype=dtype, device=device
    )
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
        out = grouped_dwconv(*leaves, offsets, chans, ks, backend=device)
        return torch.autograd.grad(out, leaves, grad_y)

    first, second = grads(), grads()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_cpu_grads_do_not_depend_on_thread_count():
    x, weight, bias, offsets, chans, ks = make_case((6, 12), (3, 7), (3, 2), 30, 31)
    grad_y = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.moce.grouped_dwconv_bwd(grad_y, x, weight, offsets, chans, ks)
        torch.set_num_threads(max(2, threads))
        multi = torch.ops.moce.grouped_dwconv_bwd(grad_y, x, weight, offsets, chans, ks)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a, b)


def test_double_backward_raises():
    x, weight, bias, offsets, chans, ks = make_case((2,), (3,), (1,), 3, 3, dtype=torch.float64)
    x.requires_grad_(True)
    out = grouped_dwconv(x, weight, bias, offsets, chans, ks, backend="cpu")
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    importlib.reload(compiled)  # would raise if the fake / autograd registrations ran twice
    x, weight, bias, offsets, chans, ks = make_case((2,), (3,), (1,), 3, 3, dtype=torch.float64)
    leaves = tuple(t.requires_grad_(True) for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda a, w, b: compiled.grouped_dwconv_compiled(a, w, b, offsets, chans, ks), leaves
    )


# --- bad input -------------------------------------------------------------------------------


def _op_args():
    x, weight, bias, offsets, chans, ks = make_case((3, 5), (3, 5), (1, 2), 6, 7)
    return dict(x=x, weight=weight, bias=bias, offsets=offsets, channels=chans, kernel_sizes=ks)


FWD_BAD_INPUTS = [
    pytest.param(dict(x=torch.randn(3, 5, 6)), "x must be a 4-D", id="x-3d"),
    pytest.param(dict(x=torch.ones(3, 5, 6, 7, dtype=torch.int32)), "x must be float32", id="x-int"),
    pytest.param(
        dict(weight=torch.randn(2, 4, 5, 5)), r"weight must have shape \[E, C_max", id="weight-cmax"
    ),
    pytest.param(dict(weight=torch.randn(2, 5, 5, 3)), r"weight must have shape", id="weight-not-square"),
    pytest.param(dict(weight=torch.randn(2, 5, 4, 4)), "K_max must be odd", id="weight-even-window"),
    pytest.param(
        dict(weight=torch.randn(2, 5, 5, 5).double()), "weight must have the dtype of x", id="w-dtype"
    ),
    pytest.param(dict(bias=torch.randn(2, 4)), r"bias must have shape \[E, C_max\]", id="bias-shape"),
    pytest.param(dict(bias=torch.randn(2, 5).double()), "bias must have the dtype of x", id="bias-dtype"),
    pytest.param(dict(offsets=torch.tensor([0, 3])), r"offsets must have shape \[E \+ 1\]", id="offsets-len"),
    pytest.param(
        dict(offsets=torch.tensor([0.0, 1.0, 3.0])), "offsets must be int64 or int32", id="offs-float"
    ),
    pytest.param(dict(offsets=torch.tensor([0, 1, 2])), "offsets must rise from 0 to N", id="offsets-end"),
    pytest.param(dict(offsets=torch.tensor([1, 1, 3])), "offsets must rise from 0 to N", id="offsets-start"),
    pytest.param(dict(offsets=torch.tensor([0, 4, 3])), "offsets must be non-decreasing", id="offsets-down"),
    pytest.param(dict(channels=[3]), "channels must have E = 2 entries", id="channels-short"),
    pytest.param(dict(channels=[0, 5]), r"channels\[0\] must be in 1..C_max", id="channels-0"),
    pytest.param(dict(channels=[3, 6]), r"channels\[1\] must be in 1..C_max", id="channels-above"),
    pytest.param(dict(kernel_sizes=[3, 5, 5]), "kernel_sizes must have E = 2 entries", id="kernels-long"),
    pytest.param(dict(kernel_sizes=[3, 4]), r"kernel_sizes\[1\] must be odd", id="kernel-even"),
    pytest.param(
        dict(kernel_sizes=[3, 7]), r"kernel_sizes\[1\] must be odd, in 1..9 and <= K_max", id="k>K_max"
    ),
    pytest.param(
        dict(weight=torch.randn(2, 5, 11, 11), kernel_sizes=[3, 11]), r"kernel_sizes\[1\]", id="kernel-11"
    ),
]


@pytest.mark.parametrize(("overrides", "match"), FWD_BAD_INPUTS)
def test_fwd_op_bad_input_raises(overrides, match):
    args = _op_args()
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.grouped_dwconv_fwd(*args.values())


BWD_BAD_INPUTS = [
    pytest.param(dict(grad_y=torch.randn(3, 5, 6, 8)), "grad_y must have the shape of x", id="grad_y-shape"),
    pytest.param(
        dict(grad_y=torch.randn(3, 5, 6, 7).double()), "grad_y must have the dtype", id="grad_y-dtype"
    ),
    pytest.param(dict(offsets=torch.tensor([0, 2, 2])), "offsets must rise from 0 to N", id="offsets-end"),
    pytest.param(dict(kernel_sizes=[3, 9]), r"kernel_sizes\[1\]", id="kernel-above-window"),
]


@pytest.mark.parametrize(("overrides", "match"), BWD_BAD_INPUTS)
def test_bwd_op_bad_input_raises(overrides, match):
    args = _op_args()
    args.pop("bias")
    args = dict(grad_y=torch.randn_like(args["x"]), **args)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.grouped_dwconv_bwd(*args.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_op_tensor_on_another_device_raises():
    args = _op_args()
    args["weight"] = args["weight"].cuda()
    with pytest.raises(RuntimeError, match="must be a cuda tensor|must be on the device of x|must be a cpu"):
        torch.ops.moce.grouped_dwconv_fwd(*args.values())


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=NEEDS_CUDA)])
def test_cuda_rows_no_expert_owns_are_nan_not_a_crash(device):
    # The CUDA op cannot check offsets without a host sync: rows past offsets[E] (here row 2 of 3)
    # come out NaN, loudly, and nothing is read or written out of bounds.
    x, weight, bias, _, chans, ks = make_case((3, 5), (3, 5), (1, 2), 6, 7, device=device)
    out = torch.ops.moce.grouped_dwconv_fwd(
        x, weight, bias, torch.tensor([0, 1, 2], device=device), chans, ks
    )
    torch.cuda.synchronize()
    assert bool(out[2].isnan().all()) and bool(out[:2].isfinite().all())
    # Offsets far out of range never index out of bounds either.
    wild = torch.tensor([-(2**40), 2**40, 7], device=device)
    out = torch.ops.moce.grouped_dwconv_fwd(x, weight, bias, wild, chans, ks)
    grads = torch.ops.moce.grouped_dwconv_bwd(torch.ones_like(x), x, weight, wild, chans, ks)
    torch.cuda.synchronize()
    assert out.shape == x.shape and grads[0].shape == x.shape
