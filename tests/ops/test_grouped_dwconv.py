"""grouped_dwconv: against per-expert F.conv2d(groups=C_e, padding=K_e // 2) on each expert's rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moce_kernels import grouped_dwconv, pack_dwconv_weights, pack_rows

# (channels, kernel_sizes, rows per expert, H, W)
CASES = [
    pytest.param(((3, 5, 16, 7), (3, 5, 7, 9), (2, 0, 3, 1), 13, 21), id="k3579-mixed-empty1-13x21"),
    pytest.param(((5, 3, 16, 1), (9, 7, 5, 3), (1, 2, 0, 2), 1, 1), id="k9753-1x1"),
    pytest.param(((4, 8, 16), (3, 5, 7), (0, 0, 3), 8, 8), id="all-rows-on-last-expert"),
    pytest.param(((2, 5, 3), (5, 9, 3), (0, 4, 0), 7, 3), id="first-and-last-empty"),
    pytest.param(((16,), (3,), (2,), 6, 5), id="E1"),
    pytest.param(((1, 3, 5), (7, 3, 9), (1, 1, 1), 13, 21), id="odd-widths-13x21"),
]

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1.3e-6, id="fp32"),
    # bf16 / fp16 inputs: the expectation is float32 math on the same rounded values.
    pytest.param(torch.bfloat16, 3e-2, 1.6e-2, id="bf16"),
    pytest.param(torch.float16, 1e-2, 2e-3, id="fp16"),
]


def make_case(channels, kernel_sizes, counts, height, width, *, dtype=torch.float32, bias=True, seed=0):
    """Per-expert leaves (weights [C_e,1,K_e,K_e], biases [C_e]) and packed rows with garbage channels."""
    g = torch.Generator().manual_seed(seed)
    # Kernels scaled by 1 / K so outputs stay O(1) for every kernel size.
    weights = [
        (torch.randn(c, 1, k, k, generator=g) / k).to(dtype)
        for c, k in zip(channels, kernel_sizes, strict=True)
    ]
    biases = [torch.randn(c, generator=g).to(dtype) for c in channels] if bias else None
    c_max, num_rows = max(channels), sum(counts)
    # Channels past C_e of an expert's rows are not its inputs: fill them with large garbage.
    x = (100 * torch.randn(num_rows, c_max, height, width, generator=g)).to(dtype)
    row = 0
    for c, n in zip(channels, counts, strict=True):
        x[row : row + n, :c] = torch.randn(n, c, height, width, generator=g).to(dtype)
        row += n
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    return weights, biases, x, offsets


def run_op(weights, biases, x, offsets, grad_out=None):
    """grouped_dwconv on packed parameters; returns (out, grads of x, weights, biases)."""
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    biases = None if biases is None else [b.detach().clone().requires_grad_(True) for b in biases]
    x = x.detach().clone().requires_grad_(True)
    weight, bias, channels, kernel_sizes = pack_dwconv_weights(weights, biases)
    out = grouped_dwconv(x, weight, bias, offsets, channels, kernel_sizes)
    if grad_out is None:
        return out
    leaves = [x, *weights, *(biases or [])]
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out, grads[0], grads[1 : 1 + len(weights)], grads[1 + len(weights) :]


def run_direct(weights, biases, x, offsets, grad_out):
    """Per-expert F.conv2d in float32 on each expert's rows and first C_e channels."""
    offs = offsets.tolist()
    c_max = x.shape[1]
    expected = torch.full(x.shape, math.nan)  # every element must be written below
    grad_x = torch.full(x.shape, math.nan)
    grad_w, grad_b = [], []
    for e, w in enumerate(weights):
        c, k = w.shape[0], w.shape[-1]
        lo, hi = offs[e], offs[e + 1]
        xe = x[lo:hi, :c].detach().float().requires_grad_(True)
        we = w.detach().float().requires_grad_(True)
        be = None if biases is None else biases[e].detach().float().requires_grad_(True)
        ye = F.conv2d(xe, we, be, padding=k // 2, groups=c)
        expected[lo:hi, :c] = ye.detach()
        expected[lo:hi, c:c_max] = 0.0
        leaves = [xe, we] + ([be] if be is not None else [])
        grads = torch.autograd.grad(ye, leaves, grad_out[lo:hi, :c].float(), allow_unused=True)
        grad_x[lo:hi, :c] = grads[0]
        grad_x[lo:hi, c:c_max] = 0.0
        # An expert without rows gets a zero gradient (its kernel was never applied).
        grad_w.append(torch.zeros_like(we) if hi == lo else grads[1])
        if be is not None:
            grad_b.append(torch.zeros_like(be) if hi == lo else grads[2])
    return expected, grad_x, grad_w, grad_b


def assert_matches_direct(weights, biases, x, offsets, *, atol, rtol):
    grad_out = torch.randn(x.shape).to(x.dtype)
    out, gx, gw, gb = run_op(weights, biases, x, offsets, grad_out)
    want, want_gx, want_gw, want_gb = run_direct(weights, biases, x, offsets, grad_out)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)
    offs = offsets.tolist()
    for e, w in enumerate(weights):
        c = w.shape[0]
        # Channels past C_e are exactly zero, in the output and in x's gradient.
        assert bool((out[offs[e] : offs[e + 1], c:] == 0).all())
        assert bool((gx[offs[e] : offs[e + 1], c:] == 0).all())
    torch.testing.assert_close(gx.float(), want_gx, atol=atol, rtol=rtol)
    # Weight and bias gradients sum over rows * H * W pixels: the tolerance grows with the square
    # root of that count (rounding errors of independent terms).
    terms = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    for e in range(len(weights)):
        assert gw[e] is not None and gw[e].dtype == x.dtype
        torch.testing.assert_close(gw[e].float(), want_gw[e], atol=atol * math.sqrt(terms), rtol=rtol)
    for e in range(len(want_gb)):
        assert gb[e] is not None
        torch.testing.assert_close(gb[e].float(), want_gb[e], atol=atol * math.sqrt(terms), rtol=rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_grouped_dwconv_matches_per_expert_conv2d(case, dtype, atol, rtol):
    assert_matches_direct(*make_case(*case, dtype=dtype), atol=atol, rtol=rtol)


def test_without_bias():
    case = make_case((3, 5, 16), (3, 9, 5), (2, 1, 2), 13, 21, bias=False)
    assert_matches_direct(*case, atol=1e-5, rtol=1.3e-6)


def test_int32_offsets():
    weights, biases, x, offsets = make_case((3, 5), (5, 3), (2, 1), 6, 7)
    want = run_op(weights, biases, x, offsets)
    torch.testing.assert_close(run_op(weights, biases, x, offsets.int()), want, atol=0, rtol=0)


def test_no_rows_at_all():
    weights, biases, x, offsets = make_case((3, 5), (3, 7), (0, 0), 5, 4)
    assert x.shape == (0, 5, 5, 4) and offsets.tolist() == [0, 0, 0]
    out, grad_x, grad_w, grad_b = run_op(weights, biases, x, offsets, grad_out=torch.ones(0, 5, 5, 4))
    assert out.shape == (0, 5, 5, 4) and out.dtype == torch.float32
    # Still part of the graph: gradients exist (and are zero) for x and every weight and bias.
    assert grad_x.shape == x.shape
    assert all(g is not None and not g.any() for g in (*grad_w, *grad_b))


def test_weight_entries_outside_each_kernel_are_ignored_and_get_no_gradient():
    weights, biases, x, offsets = make_case((3, 5, 4), (3, 7, 5), (2, 1, 2), 9, 11)
    weight, bias, channels, kernel_sizes = pack_dwconv_weights(weights, biases)
    inside = torch.zeros_like(weight, dtype=torch.bool)
    for e, (c, k) in enumerate(zip(channels, kernel_sizes, strict=True)):
        lo = (weight.shape[-1] - k) // 2
        inside[e, :c, lo : lo + k, lo : lo + k] = True
    garbage_weight = torch.where(inside, weight, torch.full_like(weight, 1e3)).requires_grad_(True)
    garbage_bias = bias.clone()
    for e, c in enumerate(channels):
        garbage_bias[e, c:] = 1e3
    garbage_bias.requires_grad_(True)
    out = grouped_dwconv(x, garbage_weight, garbage_bias, offsets, channels, kernel_sizes)
    torch.testing.assert_close(
        out, grouped_dwconv(x, weight, bias, offsets, channels, kernel_sizes), atol=0, rtol=0
    )
    grad_w, grad_b = torch.autograd.grad(out, (garbage_weight, garbage_bias), torch.randn(out.shape))
    assert bool((grad_w[~inside] == 0).all()) and bool((grad_w[inside] != 0).any())
    for e, c in enumerate(channels):
        assert bool((grad_b[e, c:] == 0).all())


def test_window_larger_than_every_kernel():
    # K_max = 9 while the experts use 3 and 5: a wider zero-padded window changes nothing.
    weights, biases, x, offsets = make_case((3, 4), (3, 5), (2, 2), 7, 6)
    weight, bias, channels, kernel_sizes = pack_dwconv_weights(weights, biases)
    wide = F.pad(weight, (2, 2, 2, 2))
    assert wide.shape[-1] == 9
    torch.testing.assert_close(
        grouped_dwconv(x, wide, bias, offsets, channels, kernel_sizes),
        grouped_dwconv(x, weight, bias, offsets, channels, kernel_sizes),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("channels", "kernel_sizes", "counts"),
    [
        pytest.param((1, 2), (3, 5), (1, 2), id="two-experts"),
        pytest.param((1, 2, 2), (5, 3, 3), (1, 0, 1), id="middle-expert-empty"),
    ],
)
def test_gradcheck(channels, kernel_sizes, counts):
    # Small on purpose: every input element costs two forward passes. 3 x 4 is smaller than the
    # 5 x 5 kernel, so the zero padding is on every side of every output.
    weights, biases, x, offsets = make_case(channels, kernel_sizes, counts, 3, 4, dtype=torch.float64)
    num_experts = len(channels)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *weights, *biases)]

    def fn(x, *params):
        weight, bias, chans, ks = pack_dwconv_weights(list(params[:num_experts]), list(params[num_experts:]))
        return grouped_dwconv(x, weight, bias, offsets, chans, ks)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


# --- packing helpers ---------------------------------------------------------------------------


def test_pack_dwconv_weights_layout():
    w3, w7 = torch.randn(2, 1, 3, 3), torch.randn(4, 1, 7, 7)
    b3, b7 = torch.randn(2), torch.randn(4)
    weight, bias, channels, kernel_sizes = pack_dwconv_weights([w3, w7], [b3, b7])
    assert (channels, kernel_sizes) == ([2, 4], [3, 7])
    want = torch.zeros(2, 4, 7, 7)
    want[0, :2, 2:5, 2:5] = w3[:, 0]
    want[1] = w7[:, 0]
    torch.testing.assert_close(weight, want, atol=0, rtol=0)
    torch.testing.assert_close(bias, torch.stack([torch.cat([b3, torch.zeros(2)]), b7]), atol=0, rtol=0)


@pytest.mark.parametrize("biases", [pytest.param(None, id="none"), pytest.param([None, None], id="all-none")])
def test_pack_without_biases(biases):
    _, bias, _, _ = pack_dwconv_weights([torch.randn(2, 1, 3, 3), torch.randn(3, 1, 5, 5)], biases)
    assert bias is None


def test_pack_rejects_mixed_biases_and_no_experts():
    with pytest.raises(ValueError, match="biases"):
        pack_dwconv_weights([torch.randn(2, 1, 3, 3), torch.randn(3, 1, 5, 5)], [torch.randn(2), None])
    with pytest.raises(ValueError, match="weights"):
        pack_dwconv_weights([])


def test_pack_rows():
    parts = [torch.randn(2, 3, 4, 5), torch.randn(0, 1, 4, 5), torch.randn(1, 5, 4, 5)]
    packed = pack_rows(parts, 5)
    want = torch.zeros(3, 5, 4, 5)
    want[:2, :3] = parts[0]
    want[2:, :5] = parts[2]
    torch.testing.assert_close(packed, want, atol=0, rtol=0)


# --- bad input -------------------------------------------------------------------------------


def _valid_args():
    """Two experts (C 3 and 5, K 3 and 5) over 3 rows of [5, 6, 7]."""
    weight, bias, channels, kernel_sizes = pack_dwconv_weights(
        [torch.randn(3, 1, 3, 3), torch.randn(5, 1, 5, 5)], [torch.randn(3), torch.randn(5)]
    )
    return dict(
        x=torch.randn(3, 5, 6, 7),
        weight=weight,
        bias=bias,
        offsets=torch.tensor([0, 1, 3]),
        channels=channels,
        kernel_sizes=kernel_sizes,
        backend="auto",
    )


BAD_INPUTS = [
    pytest.param(dict(kernel_sizes=[3, 4]), ValueError, "kernel_sizes", id="even-kernel"),
    pytest.param(dict(kernel_sizes=[1, 5]), ValueError, "kernel_sizes", id="kernel-1"),
    pytest.param(
        dict(weight=torch.randn(2, 5, 11, 11), kernel_sizes=[3, 11]),
        ValueError,
        "kernel_sizes",
        id="kernel-11",
    ),
    pytest.param(dict(kernel_sizes=[3, 7]), ValueError, "K_max", id="kernel-wider-than-window"),
    pytest.param(dict(kernel_sizes=[3, 5.0]), TypeError, "kernel_sizes", id="kernel-float"),
    pytest.param(dict(kernel_sizes=[True, 5]), TypeError, "kernel_sizes", id="kernel-bool"),
    pytest.param(
        dict(weight=torch.randn(2, 5, 4, 4), kernel_sizes=[3, 3]), ValueError, "K_max", id="even-window"
    ),
    pytest.param(dict(channels=[3, 6]), ValueError, "channels", id="channels-above-cmax"),
    pytest.param(dict(channels=[0, 5]), ValueError, "channels", id="channels-zero"),
    pytest.param(dict(channels=[2.5, 5]), TypeError, "channels", id="channels-float"),
    pytest.param(
        dict(weight=torch.randn(2, 5, 5, 5, dtype=torch.float64)), TypeError, "weight", id="weight-dtype"
    ),
    pytest.param(dict(bias=torch.randn(2, 5, dtype=torch.bfloat16)), TypeError, "bias", id="bias-dtype"),
    pytest.param(dict(channels=[3]), ValueError, "channels", id="channels-too-short"),
    pytest.param(dict(kernel_sizes=[3, 5, 5]), ValueError, "kernel_sizes", id="kernel-sizes-too-long"),
    pytest.param(dict(offsets=torch.tensor([0, 1, 2])), ValueError, "offsets", id="offsets-not-ending-at-N"),
    pytest.param(
        dict(offsets=torch.tensor([1, 1, 3])), ValueError, "offsets", id="offsets-not-starting-at-0"
    ),
    pytest.param(dict(offsets=torch.tensor([0, 4, 3])), ValueError, "offsets", id="offsets-decreasing"),
    pytest.param(dict(offsets=torch.tensor([0, 3])), ValueError, "offsets", id="offsets-wrong-length"),
    pytest.param(dict(offsets=torch.tensor([0.0, 1.0, 3.0])), TypeError, "offsets", id="offsets-float"),
    pytest.param(dict(weight=torch.randn(2, 5, 5)), ValueError, "weight", id="weight-rank-3"),
    pytest.param(dict(weight=torch.randn(2, 4, 5, 5)), ValueError, "weight", id="weight-wrong-cmax"),
    pytest.param(dict(weight=torch.randn(2, 5, 5, 3)), ValueError, "weight", id="weight-not-square"),
    pytest.param(
        dict(weight=torch.randn(3, 5, 5, 5), bias=None), ValueError, "offsets", id="weight-more-experts"
    ),
    pytest.param(dict(bias=torch.randn(2, 4)), ValueError, "bias", id="bias-wrong-shape"),
    pytest.param(dict(bias=torch.randn(5)), ValueError, "bias", id="bias-1d"),
    pytest.param(dict(x=torch.randn(3, 5, 6)), ValueError, "x", id="x-3d"),
    pytest.param(dict(x=torch.ones(3, 5, 6, 7, dtype=torch.int64)), TypeError, "x", id="x-int"),
    pytest.param(dict(backend="fast"), ValueError, "backend", id="backend-unknown"),
    pytest.param(dict(backend="cuda"), RuntimeError, "cuda", id="backend-cuda-on-cpu-tensors"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_INPUTS)
def test_bad_input_raises(overrides, error, match):
    args = _valid_args()
    args.update(overrides)
    backend = args.pop("backend")
    with pytest.raises(error, match=match):
        grouped_dwconv(**args, backend=backend)


def test_valid_args_pass():
    # The base of every bad-input case is itself valid, so each case fails for its own reason.
    args = _valid_args()
    backend = args.pop("backend")
    out = grouped_dwconv(**args, backend=backend)
    want = F.conv2d(
        args["x"][:1, :3],
        args["weight"][0, :3, 1:4, 1:4].unsqueeze(1),
        args["bias"][0, :3],
        padding=1,
        groups=3,
    )
    torch.testing.assert_close(out[:1, :3], want)


# --- property --------------------------------------------------------------------------------


@st.composite
def _dwconv_case(draw):
    num_experts = draw(st.integers(1, 4))
    return dict(
        channels=tuple(draw(st.integers(1, 6)) for _ in range(num_experts)),
        kernel_sizes=tuple(draw(st.sampled_from([3, 5, 7, 9])) for _ in range(num_experts)),
        counts=tuple(draw(st.integers(0, 3)) for _ in range(num_experts)),
        height=draw(st.integers(1, 9)),
        width=draw(st.integers(1, 9)),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=25, deadline=None)
@given(case=_dwconv_case())
def test_property_grouped_dwconv_matches_per_expert_conv2d(case):
    bias = case.pop("bias")
    seed = case.pop("seed")
    weights, biases, x, offsets = make_case(**case, bias=bias, seed=seed)
    if x.shape[0] == 0:
        assert run_op(weights, biases, x, offsets).shape == x.shape
        return
    assert_matches_direct(weights, biases, x, offsets, atol=1e-5, rtol=1.3e-6)
