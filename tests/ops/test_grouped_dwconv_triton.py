"""grouped_dwconv on the Triton kernels: the interpreter on the CPU here, the GPU when there is one.

Forward and every gradient against ``grouped_dwconv_reference`` (the Triton side through the public
function with ``backend="triton"``, so the plumbing runs too): kernel sizes 3, 5, 7, 9 mixed in one
call, experts without rows, N = 0, 13 x 21 and 1 x 1 planes, planes over several tiles, C_max not a
multiple of anything, plans from ``route`` with k = 1..E; exact zeros outside each expert's
channels and window; NaN-filled buffers; determinism; the ordinary depthwise convolution
``depthwise_conv2d_triton``; gradcheck, ``opcheck``, torch.compile, and an ahead-of-time compile of
every kernel for sm_90.
"""

from __future__ import annotations

import importlib
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import grouped_dwconv
from moce_kernels.grouped_dwconv.reference import centre_slice, grouped_dwconv_reference, pack_dwconv_weights
from tests.ops._helpers import (
    AOT_PRELUDE,
    TRITON_DEVICE,
    nan_empty,
    run_aot_script,
    skip_unless_triton_usable,
)

skip_unless_triton_usable()

# Imported by path: ``moce_kernels.grouped_dwconv`` the attribute is the function, not the package.
dw_triton = importlib.import_module("moce_kernels.grouped_dwconv.triton")
grouped_dwconv_triton = dw_triton.grouped_dwconv_triton
depthwise_conv2d_triton = dw_triton.depthwise_conv2d_triton

#: The interpreter runs on CPU tensors; compiled Triton needs CUDA tensors.
DEVICE = TRITON_DEVICE

# (channels, kernel_sizes, rows per expert, H, W)
# The interpreter's cost is per program and per tap (rows * C_max * tiles * K_e^2): the cases
# keep rows and widths small and put the 9x9 kernels on few planes.
CASES = [
    pytest.param(((2, 3, 2, 1), (3, 5, 7, 9), (2, 0, 1, 1), 13, 21), id="k3579-mixed-empty1-13x21"),
    pytest.param(((2, 3, 4, 1), (9, 7, 5, 3), (1, 1, 0, 1), 1, 1), id="k9753-1x1"),
    pytest.param(((4, 7, 3), (7, 5, 3), (0, 0, 2), 8, 8), id="all-rows-on-last-expert"),
    pytest.param(((2, 3, 1), (5, 9, 3), (0, 1, 0), 7, 3), id="first-and-last-empty"),
    # Planes over 2 x 2 tiles (16 x 64): the halo crosses tile borders.
    pytest.param(((3,), (3,), (1,), 20, 70), id="E1-k3-20x70-tiles"),
    pytest.param(((1, 2), (9, 3), (1, 1), 17, 65), id="k93-17x65-tiles"),
    pytest.param(((3, 4), (3, 5), (0, 0), 5, 6), id="N0"),
]
FP16_CASES = [CASES[0], CASES[1]]

# (dtype, atol, rtol): the expectation is the reference in float32 on the same (rounded) values,
# so the kernels' float32 accumulation differs from it by float32 rounding plus one rounding of
# the result to the dtype. Weight / bias gradients sum over rows * H * W terms: their atol grows
# with the square root of that count.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1.3e-6, id="fp32"),
    pytest.param(torch.bfloat16, 1.6e-2, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]


def make_case(
    channels, kernel_sizes, counts, height, width, *, dtype=torch.float32, bias=True, k_max=None, seed=0
):
    """Packed (x, weight, bias, offsets) with NaN wherever an expert must not look.

    x's channels past an expert's width, weight entries outside an expert's K_e x K_e window or
    past its width, and bias entries past its width are NaN: reading any of them poisons the
    result. ``k_max`` widens the window beyond the largest kernel size.
    """
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(c, 1, k, k, generator=g) / k for c, k in zip(channels, kernel_sizes, strict=True)]
    biases = [torch.randn(c, generator=g) for c in channels] if bias else None
    weight, packed_bias, ch, ks = pack_dwconv_weights(weights, biases)
    if k_max is not None and k_max > weight.shape[-1]:
        pad = (k_max - weight.shape[-1]) // 2
        weight = F.pad(weight, (pad, pad, pad, pad))
    k_max = weight.shape[-1]
    c_max, rows = max(channels), sum(counts)
    x = torch.randn(rows, c_max, height, width, generator=g)
    row = 0
    for e, (c, k, n) in enumerate(zip(channels, kernel_sizes, counts, strict=True)):
        x[row : row + n, c:] = math.nan
        row += n
        window = centre_slice(k_max, k)
        keep = torch.zeros(c_max, k_max, k_max, dtype=torch.bool)
        keep[:c, window, window] = True
        weight[e][~keep] = math.nan
        if packed_bias is not None:
            packed_bias[e, c:] = math.nan
    offsets = torch.tensor([0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()])
    to = dict(dtype=dtype, device=DEVICE)
    return (
        x.to(**to),
        weight.to(**to),
        None if packed_bias is None else packed_bias.to(**to),
        offsets.to(DEVICE),
        ch,
        ks,
    )


def run(fn, x, weight, bias, offsets, channels, kernel_sizes, grad_out):
    """(out, grad x, grad weight, grad bias or None) of ``fn`` on fresh leaves."""
    leaves = [
        t.detach().clone().requires_grad_(True) for t in (x, weight) + ((bias,) if bias is not None else ())
    ]
    b = leaves[2] if bias is not None else None
    out = fn(leaves[0], leaves[1], b, offsets, channels, kernel_sizes)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, *grads, *((None,) if bias is None else ())


def triton_public(x, weight, bias, offsets, channels, kernel_sizes):
    return grouped_dwconv(x, weight, bias, offsets, channels, kernel_sizes, backend="triton")


def reference_fp32(x, weight, bias, offsets, channels, kernel_sizes):
    """The reference in float32 (float64 for float64) on the same values, as a differentiable fn."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return grouped_dwconv_reference(
        x.to(acc),
        weight.to(acc),
        None if bias is None else bias.to(acc),
        offsets.tolist(),
        channels,
        kernel_sizes,
    )


def assert_matches_reference(case, atol, rtol, fn=triton_public):
    x, weight, bias, offsets, channels, kernel_sizes = case
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(DEVICE)
    got = run(fn, *case, grad_out)
    want = run(reference_fp32, *case, grad_out)
    out, grad_x, grad_w, grad_b = got
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    assert grad_x.dtype == x.dtype and grad_w.dtype == weight.dtype and grad_w.shape == weight.shape
    terms = math.sqrt(max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    tolerances = ((atol, rtol), (atol, rtol), (atol * terms, rtol), (atol * terms, rtol))
    for name, a, b, (t_abs, t_rel) in zip(
        ("output", "grad x", "grad w", "grad b"), got, want, tolerances, strict=True
    ):
        if a is None:
            continue
        # The reference's NaN garbage past each expert's channels stays out of its results too.
        assert bool(a.isfinite().all()), f"{name} has NaN/Inf"
        torch.testing.assert_close(a.double(), b.double(), atol=t_abs, rtol=t_rel, msg=name)
    assert_zero_outside(case, out, grad_x, grad_w, grad_b)


def assert_zero_outside(case, out, grad_x, grad_w, grad_b):
    """Exact zeros past each expert's channels (output, grad x), outside its window and channels
    (grad weight, grad bias), and for every parameter of an expert without rows."""
    x, weight, _, offsets, channels, kernel_sizes = case
    offs, k_max = offsets.tolist(), weight.shape[-1]
    for e, (c, k) in enumerate(zip(channels, kernel_sizes, strict=True)):
        lo, hi = offs[e], offs[e + 1]
        assert bool((out[lo:hi, c:] == 0).all()), f"expert {e}: output past its channels"
        assert bool((grad_x[lo:hi, c:] == 0).all()), f"expert {e}: grad x past its channels"
        window = centre_slice(k_max, k)
        inside = torch.zeros(weight.shape[1:], dtype=torch.bool, device=weight.device)
        inside[:c, window, window] = hi > lo
        assert bool((grad_w[e][~inside] == 0).all()), f"expert {e}: grad w outside its window"
        if grad_b is not None:
            assert bool((grad_b[e, c:] == 0).all()), f"expert {e}: grad b past its channels"
            if hi == lo:
                assert bool((grad_b[e] == 0).all()), f"expert {e} has no rows: grad b must be 0"


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The interpreter with the GPU's block sizes (it normally takes 8x more channels per program)."""
    monkeypatch.setattr(dw_triton, "_INTERPRETER_TILE_ELEMENTS", dw_triton._TILE_ELEMENTS)


@pytest.fixture
def one_channel_blocks(monkeypatch):
    """One channel per program, in the convolutions and in the weight-gradient reduction."""
    monkeypatch.setattr(dw_triton, "_INTERPRETER_TILE_ELEMENTS", 1)
    monkeypatch.setattr(dw_triton, "_TILE_ELEMENTS", 1)


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element a kernel skips shows up."""
    monkeypatch.setattr(dw_triton, "_empty", nan_empty)


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES[:2])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, atol, rtol):
    assert_matches_reference(make_case(*case, dtype=dtype), atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES[2:])
@pytest.mark.parametrize("case", FP16_CASES)
def test_matches_reference_fp16(case, dtype, atol, rtol):
    assert_matches_reference(make_case(*case, dtype=dtype), atol, rtol)


@pytest.mark.parametrize(
    ("case", "blocks"),
    [
        # GPU blocks on 17 x 65: 2 channels per program, so expert 1 (width 1) owns a block wholly
        # past its channels.
        pytest.param(((3, 1), (3, 5), (1, 1), 17, 65), "gpu_blocks", id="gpu-blocks-17x65"),
        pytest.param(
            ((2, 3, 2, 1), (3, 5, 7, 9), (1, 0, 1, 1), 5, 6), "one_channel_blocks", id="one-channel"
        ),
    ],
)
def test_channel_blocks_match_reference(case, blocks, request):
    request.getfixturevalue(blocks)
    params = dw_triton._blocks(max(case[0]), case[3], case[4])
    assert params["c_blocks"] > 1
    assert_matches_reference(make_case(*case), 1e-5, 1.3e-6)


def test_without_bias():
    case = make_case((3, 2), (5, 3), (1, 2), 6, 7, bias=False)
    assert_matches_reference(case, 1e-5, 1.3e-6)


def test_window_wider_than_every_kernel():
    # K_max = 9 while the experts use 3 and 5: the NaN border of the window is never read.
    case = make_case((2, 3), (3, 5), (1, 1), 5, 6, k_max=9)
    assert case[1].shape[-1] == 9
    assert_matches_reference(case, 1e-5, 1.3e-6)


def test_int32_offsets_and_direct_call():
    x, weight, bias, offsets, channels, kernel_sizes = make_case((2, 3), (3, 7), (2, 1), 4, 5)
    case = (x, weight, bias, offsets.to(torch.int32), channels, kernel_sizes)
    assert_matches_reference(case, 1e-5, 1.3e-6, fn=grouped_dwconv_triton)


@pytest.mark.parametrize("k", [pytest.param(k, id=f"k{k}") for k in (1, 2, 3, 4)])
def test_rows_from_route(k, make_routing):
    # Packed rows as a routing plan lays them out: B = 2 images, each on k of E = 4 experts.
    _, plan = make_routing(2, 4, k, "some_empty" if k < 4 else "random", seed=k)
    counts = plan.counts.tolist()
    x, weight, bias, _, channels, kernel_sizes = make_case((1, 2, 1, 2), (3, 5, 3, 3), counts, 3, 4)
    assert_matches_reference((x, weight, bias, plan.offsets.to(DEVICE), channels, kernel_sizes), 1e-5, 1.3e-6)


@pytest.mark.parametrize(
    "layout", [pytest.param("channels_last", id="channels-last"), pytest.param("sliced", id="sliced")]
)
def test_non_contiguous_input(layout):
    x, weight, bias, offsets, channels, kernel_sizes = make_case((2, 3), (3, 5), (1, 2), 5, 6)
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    else:
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        x_in = wide[..., ::2]
    assert not x_in.is_contiguous()
    got = grouped_dwconv(x_in, weight, bias, offsets, channels, kernel_sizes, backend="triton")
    want = grouped_dwconv(x, weight, bias, offsets, channels, kernel_sizes, backend="triton")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- buffers, determinism -----------------------------------------------------------------------


def _fwd_bwd(x, weight, bias, offsets, channels, kernel_sizes):
    y = torch.ops.moce_triton.grouped_dwconv_fwd(x, weight, bias, offsets, channels, kernel_sizes)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype).to(x.device)
    return (y, *torch.ops.moce_triton.grouped_dwconv_bwd(grad_y, x, weight, offsets, channels, kernel_sizes))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(((3, 5, 2), (3, 9, 5), (1, 0, 2), 13, 21), id="k395-empty-13x21"),
        pytest.param(((1,), (5,), (1,), 17, 65), id="k5-tiles"),
        pytest.param(((2, 1), (5, 3), (1, 1), 1, 1), id="1x1"),
        pytest.param(((3, 1), (3, 5), (1, 1), 17, 65), id="gpu-blocks-17x65"),
    ],
)
def test_every_element_is_written(case, request):
    """With NaN-filled outputs, partial sums and gradients, the results are the same bits as with
    the normal buffers: every element written, no partial sum read that was not written."""
    if "gpu-blocks" in request.node.callspec.id:
        request.getfixturevalue("gpu_blocks")
    args = make_case(*case)
    want = _fwd_bwd(*args)
    request.getfixturevalue("nan_buffers")
    got = _fwd_bwd(*args)
    for name, a, b in zip(("y", "grad x", "grad w", "grad b"), got, want, strict=True):
        assert not bool(a.isnan().any()), f"{name}: an element was not written"
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16")])
def test_backward_is_deterministic(dtype, gpu_blocks):
    # Several rows and 2 x 2 tiles per plane: the reduction sums rows * tiles partial sums.
    case = make_case((2, 1), (3, 5), (2, 1), 17, 65, dtype=dtype)
    grad_out = torch.randn(case[0].shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    first = run(grouped_dwconv_triton, *case, grad_out)
    second = run(grouped_dwconv_triton, *case, grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_no_rows_gives_zero_param_grads():
    x, weight, bias, offsets, channels, kernel_sizes = make_case((3, 4), (3, 5), (0, 0), 5, 6)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias)]
    out = grouped_dwconv_triton(*leaves, offsets, channels, kernel_sizes)
    assert out.shape == (0, 4, 5, 6)
    grad_x, grad_w, grad_b = torch.autograd.grad(out.sum(), leaves)
    assert grad_x.shape == x.shape
    assert torch.equal(grad_w, torch.zeros_like(weight)) and torch.equal(grad_b, torch.zeros_like(bias))


# --- depthwise_conv2d_triton: the trunk's ordinary depthwise convolutions -----------------------


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol", "bias"),
    [
        pytest.param(*DTYPES[0].values, True, id="fp32-bias"),
        pytest.param(*DTYPES[0].values, False, id="fp32-no-bias"),
        pytest.param(*DTYPES[1].values, True, id="bf16-bias"),
    ],
)
@pytest.mark.parametrize(
    ("shape", "k"),
    [
        pytest.param((2, 5, 13, 21), 3, id="3x3-13x21"),
        pytest.param((1, 3, 13, 21), 7, id="7x7-13x21"),
        pytest.param((1, 2, 1, 1), 7, id="7x7-1x1"),
        pytest.param((0, 4, 5, 5), 3, id="N0"),
    ],
)
def test_depthwise_matches_conv2d(shape, k, bias, dtype, atol, rtol):
    g = torch.Generator().manual_seed(4)
    channels = shape[1]
    x = torch.randn(shape, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    w = (torch.randn(channels, 1, k, k, generator=g) / k).to(dtype).to(DEVICE).requires_grad_(True)
    b = torch.randn(channels, generator=g).to(dtype).to(DEVICE).requires_grad_(True) if bias else None
    leaves = [x, w] + ([b] if bias else [])
    out = depthwise_conv2d_triton(x, w, b)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    want = F.conv2d(
        ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, padding=k // 2, groups=channels
    )
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)
    grad_out = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, grad_out)
    want_grads = torch.autograd.grad(want, ref_leaves, grad_out.float())
    terms = math.sqrt(max(1, shape[0] * shape[2] * shape[3]))
    tolerances = (atol, atol * terms, atol * terms)[: len(leaves)]
    for name, got, ref, t_abs in zip(("x", "w", "b"), grads, want_grads, tolerances, strict=False):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), ref, atol=t_abs, rtol=rtol, msg=name)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "b_shape", "error", "match"),
    [
        pytest.param((2, 3, 4), (3, 1, 3, 3), None, ValueError, "x must be", id="x-3d"),
        pytest.param((2, 3, 4, 4), (4, 1, 3, 3), None, ValueError, "weight must be", id="weight-channels"),
        pytest.param((2, 3, 4, 4), (3, 1, 3, 5), None, ValueError, "weight must be", id="weight-not-square"),
        pytest.param((2, 3, 4, 4), (3, 1, 11, 11), None, ValueError, "kernel size", id="k11"),
        pytest.param((2, 3, 4, 4), (3, 1, 4, 4), None, ValueError, "kernel size", id="k4"),
        pytest.param((2, 3, 4, 4), (3, 1, 3, 3), (4,), ValueError, "bias", id="bias-shape"),
    ],
)
def test_depthwise_bad_input_raises(x_shape, w_shape, b_shape, error, match):
    bias = None if b_shape is None else torch.randn(b_shape, device=DEVICE)
    with pytest.raises(error, match=match):
        depthwise_conv2d_triton(
            torch.randn(x_shape, device=DEVICE), torch.randn(w_shape, device=DEVICE), bias
        )


def test_depthwise_dtype_mismatch_raises():
    x = torch.randn(1, 2, 3, 3, device=DEVICE)
    with pytest.raises(TypeError, match="weight"):
        depthwise_conv2d_triton(x, torch.randn(2, 1, 3, 3, dtype=torch.float64, device=DEVICE), None)


# --- the ops: gradcheck, opcheck, torch.compile -------------------------------------------------


@pytest.mark.parametrize(
    ("case", "bias"),
    [
        pytest.param(((2, 1), (3, 5), (1, 1), 3, 4), True, id="k35-bias"),
        pytest.param(((1, 2), (7, 3), (1, 1), 4, 3), False, id="k73-no-bias"),
    ],
)
def test_gradcheck(case, bias):
    x, weight, b, offsets, channels, kernel_sizes = make_case(*case, dtype=torch.float64, bias=bias)
    # Finite garbage: gradcheck perturbs every element, also the ones the op ignores.
    x, weight = x.nan_to_num(3.0), weight.nan_to_num(3.0)
    leaves = [x, weight] + ([b.nan_to_num(3.0)] if bias else [])
    leaves = [t.requires_grad_(True) for t in leaves]

    def fn(*args):
        return grouped_dwconv_triton(
            args[0], args[1], args[2] if bias else None, offsets, channels, kernel_sizes
        )

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize(
    ("dtype", "requires_grad", "bias"),
    [
        pytest.param(torch.float32, True, True, id="fp32-grad"),
        pytest.param(torch.float32, True, False, id="fp32-grad-no-bias"),
        pytest.param(torch.bfloat16, False, True, id="bf16"),
    ],
)
def test_opcheck(dtype, requires_grad, bias):
    # Every default opcheck sub-test (test_schema, test_autograd_registration, test_faketensor,
    # test_aot_dispatch_dynamic) passes under the interpreter: the ops are custom_op + register_fake.
    x, weight, b, offsets, channels, kernel_sizes = make_case(
        (1, 2), (3, 5), (1, 1), 3, 4, dtype=dtype, bias=bias
    )
    x, weight = x.nan_to_num(0.0), weight.nan_to_num(0.0)
    b = None if b is None else b.nan_to_num(0.0).requires_grad_(requires_grad)
    args = (
        x.requires_grad_(requires_grad),
        weight.requires_grad_(requires_grad),
        b,
        offsets,
        channels,
        kernel_sizes,
    )
    torch.library.opcheck(torch.ops.moce_triton.grouped_dwconv_fwd.default, args)
    grad_y = torch.randn_like(x)
    bwd_args = (grad_y, x.detach(), weight.detach(), offsets, channels, kernel_sizes)
    torch.library.opcheck(torch.ops.moce_triton.grouped_dwconv_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    x, weight, bias, offsets, channels, kernel_sizes = make_case((2, 3), (3, 5), (1, 1), 4, 5)
    leaves = [t.nan_to_num(0.0).requires_grad_(True) for t in (x, weight, bias)]

    def fn(a, w, b):
        return grouped_dwconv_triton(a, w, b, offsets, channels, kernel_sizes)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, want = compiled(*leaves), fn(*leaves)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_double_backward_raises():
    x, weight, bias, offsets, channels, kernel_sizes = make_case((2,), (3,), (1,), 3, 3, dtype=torch.float64)
    x.requires_grad_(True)
    out = grouped_dwconv_triton(x, weight, bias, offsets, channels, kernel_sizes)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    importlib.reload(dw_triton)  # would raise if the ops were defined twice
    case = make_case((2, 1), (3, 5), (1, 1), 3, 4)
    assert_matches_reference(case, 1e-5, 1.3e-6, fn=dw_triton.grouped_dwconv_triton)


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES[:2])
def test_gpu_moce_ir_s_expert_shapes(dtype, atol, rtol):
    # A MoCE-IR-S decoder level of width 64 at 64 x 64 (batch 8, k = 1): experts of ranks
    # 8, 16, 32, 64; the kv depthwise convs (7x7 on 2r channels) as one call.
    counts = (3, 0, 4, 1)
    case = make_case((16, 32, 64, 128), (7, 7, 7, 7), counts, 64, 64, dtype=dtype)
    assert_matches_reference(case, atol, rtol)
    case = make_case((8, 16, 32, 64), (3, 5, 7, 9), counts, 64, 64, dtype=dtype)
    assert_matches_reference(case, atol, rtol)


# --- ahead-of-time compile for sm_90 ------------------------------------------------------------

AOT_SCRIPT = AOT_PRELUDE + textwrap.dedent(
    """
    from moce_kernels.grouped_dwconv import triton as dw

    warps = dw._CONV_WARPS
    common = dict(C_MAX="i32", H="i32", W="i32", E="i32", c_blocks="i32", tiles_w="i32", tiles="i32")
    fwd = dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", off_ptr="*i64", meta_ptr="*i32", y_ptr="*bf16",
               **common)
    blocks = dict(BLOCK_C=2, BLOCK_H=16, BLOCK_W=64, ACC=tl.float32)
    # Two kernel sizes in one call (the experts' branches), a single 3x3 with bias and a flipped
    # 7x7 (the trunk's convolutions and their grad x); the weight gradient on the 9x9 branch. Every
    # size is the same template (_conv_taps / _weight_taps with KS a constexpr): compiling each
    # branch once keeps CI's cold compile short (the all-sizes kernel alone takes ~25 s).
    for k_max, kernel_set, has_bias, flip, block_e in ((5, 3, True, False, 2), (3, 1, True, False, 1),
                                                        (7, 4, False, True, 1)):
        consts = dict(K_MAX=k_max, KERNEL_SET=kernel_set, HAS_BIAS=has_bias, FLIP=flip, BLOCK_E=block_e)
        compile_(dw.grouped_dwconv_fwd_kernel, fwd, dict(consts, **blocks), warps)
    bwd = dict(x_ptr="*bf16", gy_ptr="*bf16", off_ptr="*i64", meta_ptr="*i32", part_w_ptr="*fp32",
               part_b_ptr="*fp32", **common)
    compile_(dw.grouped_dwconv_bwd_weight_kernel, bwd, dict(K_MAX=9, KERNEL_SET=8, BLOCK_E=4, **blocks),
             warps)
    fwd64 = {k: ("*fp64" if v == "*bf16" else v) for k, v in fwd.items()}
    consts64 = dict(K_MAX=5, KERNEL_SET=3, HAS_BIAS=True, FLIP=False, BLOCK_E=2, BLOCK_C=8, BLOCK_H=8,
                    BLOCK_W=32, ACC=tl.float64)
    compile_(dw.grouped_dwconv_fwd_kernel, fwd64, consts64, warps)
    red = dict(part_w_ptr="*fp32", part_b_ptr="*fp32", off_ptr="*i32", meta_ptr="*i32", gw_ptr="*fp16",
               gb_ptr="*fp16", C_MAX="i32", E="i32", c_blocks="i32", tiles="i32")
    red_consts = dict(K_MAX=9, BLOCK_C=2, BLOCK_TILES=16, BLOCK_T=128, ACC=tl.float32)
    compile_(dw.grouped_dwconv_bwd_reduce_kernel, red, red_consts, num_warps=4)
    """
)


def test_aot_compile_sm90():
    """Compile every kernel for sm_90 (Triton's own compiler, no GPU needed): catches what the
    interpreter forgives (constexpr misuse, dtype mismatches in loops and branches). Runs in a
    subprocess without TRITON_INTERPRET, which swaps Triton's own jit helpers for interpreted ones.
    The first run takes ~30 s on 2 cores (the unrolled 9x9 branch); Triton caches the result."""
    assert run_aot_script(AOT_SCRIPT).count("compiled") == 6
