"""The sync-free grouped expert ops (grouped_pointwise, grouped_layernorm2d,
grouped_patch_fft_conv) against their per-expert definitions on each expert's rows and channels,
forward and every gradient; and their argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import (
    grouped_layernorm2d,
    grouped_patch_fft_conv,
    grouped_pointwise,
    layernorm2d,
    pack_pointwise_weights,
    patch_fft_conv,
)

# (channels per expert, rows per expert, H, W)
LAYOUTS = [
    pytest.param((3, 5, 16, 7), (2, 0, 3, 1), 13, 21, id="E4-empty1-13x21"),
    pytest.param((4, 8, 2), (0, 0, 3), 8, 8, id="all-rows-on-last-expert"),
    pytest.param((2, 5, 3), (0, 1, 0), 1, 1, id="B1-1x1"),
    pytest.param((6,), (2,), 5, 3, id="E1"),
    pytest.param((3, 4), (0, 0), 4, 4, id="N0"),
]


def _offsets(counts) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


def _rows(channels, counts, height, width, *, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Packed rows whose channels past each expert's width hold NaN: they must be ignored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((sum(counts), max(channels), height, width), math.nan)
    row = 0
    for c, n in zip(channels, counts, strict=True):
        x[row : row + n, :c] = torch.randn(n, c, height, width, generator=g)
        row += n
    return x.to(dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _expert_rows(counts):
    offs = _offsets(counts).tolist()
    return [(e, offs[e], offs[e + 1]) for e in range(len(counts)) if offs[e + 1] > offs[e]]


def _check(got, got_grads, want, want_grads, channels, counts, atol, rtol):
    """Each expert's channels equal the definition and the rest are exact zeros; then gradients."""
    for e, lo, hi in _expert_rows(counts):
        torch.testing.assert_close(
            got[lo:hi, : want[e].shape[1]].float(), want[e].float(), atol=atol, rtol=rtol
        )
        assert not got[lo:hi, want[e].shape[1] :].any(), f"expert {e}: channels past its width are not 0"
    for name, g, w in zip(want_grads, got_grads, want_grads.values(), strict=True):
        torch.testing.assert_close(
            g.float(), w.float(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


# --- grouped_pointwise ------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "counts", "height", "width"), LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_grouped_pointwise_matches_per_expert_conv(channels, counts, height, width, bias):
    g = torch.Generator().manual_seed(1)
    outs = [c + 1 + e for e, c in enumerate(channels)]  # every expert its own (out, in) shape
    weights = [_leaf(torch.randn(o, c, 1, 1, generator=g)) for o, c in zip(outs, channels, strict=True)]
    biases = [_leaf(torch.randn(o, generator=g)) for o in outs] if bias else None
    x = _leaf(_rows(channels, counts, height, width))
    weight, packed_bias, c_in, c_out = pack_pointwise_weights(weights, biases)
    assert (c_in, c_out) == (list(channels), outs)
    y = grouped_pointwise(x, weight, packed_bias, _offsets(counts), c_in, c_out)
    assert y.shape == (x.shape[0], max(outs), height, width)
    grad_y = torch.randn(y.shape, generator=g)
    leaves = [x, *weights, *(biases or [])]
    got_grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)

    want, want_grads = {}, {}
    grad_x = torch.zeros_like(x)
    for e, lo, hi in _expert_rows(counts):
        xe = _leaf(x[lo:hi, : channels[e]])
        we = _leaf(weights[e])
        be = None if biases is None else _leaf(biases[e])
        want[e] = F.conv2d(xe, we, be)
        grads = torch.autograd.grad(want[e], [xe, we, *([be] if bias else [])], grad_y[lo:hi, : outs[e]])
        grad_x[lo:hi, : channels[e]] = grads[0]
        want_grads[f"weight[{e}]"], want_grads[f"bias[{e}]"] = grads[1], grads[2] if bias else None
    # Experts without rows get zero gradients (every expert's parameters are in the graph).
    got = {"x": got_grads[0]}
    for e in range(len(channels)):
        got[f"weight[{e}]"] = got_grads[1 + e]
        if bias:
            got[f"bias[{e}]"] = got_grads[1 + len(channels) + e]
    expected = {"x": grad_x}
    for e in range(len(channels)):
        expected[f"weight[{e}]"] = want_grads.get(f"weight[{e}]", torch.zeros_like(weights[e]))
        if bias:
            expected[f"bias[{e}]"] = want_grads.get(f"bias[{e}]", torch.zeros_like(biases[e]))
    _check(y, [got[k] for k in expected], want, expected, channels, counts, 1e-5, 1e-5)


def test_grouped_pointwise_bf16_accumulates_like_conv2d():
    channels, counts = (8, 16), (2, 3)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(2, 12, 16, generator=g).bfloat16()
    x = _rows(channels, counts, 6, 5, dtype=torch.bfloat16)
    y = grouped_pointwise(x, weight, None, _offsets(counts), list(channels), [12, 12])
    assert y.dtype == torch.bfloat16
    for e, lo, hi in _expert_rows(counts):
        want = F.conv2d(x[lo:hi, : channels[e]].float(), weight[e, :, : channels[e], None, None].float())
        # bf16 output rounding (8 bits of mantissa) over float32 sums of the same rounded inputs.
        torch.testing.assert_close(y[lo:hi].float(), want, atol=2e-2, rtol=1.6e-2)


# --- grouped_layernorm2d --------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "counts", "height", "width"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_grouped_layernorm2d_matches_per_expert_layernorm(channels, counts, height, width, dtype):
    g = torch.Generator().manual_seed(3)
    c_max = max(channels)
    weight = _leaf(torch.randn(len(channels), c_max, generator=g).to(dtype))
    bias = _leaf(torch.randn(len(channels), c_max, generator=g).to(dtype))
    x = _leaf(3 * _rows(channels, counts, height, width, dtype=dtype) + 1)
    y = grouped_layernorm2d(x, weight, bias, _offsets(counts), list(channels), 1e-5)
    grad_y = torch.randn(y.shape, generator=g, dtype=dtype)
    got_grads = torch.autograd.grad(y, [x, weight, bias], grad_y)

    want = {}
    expected = {"x": torch.zeros_like(x), "weight": torch.zeros_like(weight), "bias": torch.zeros_like(bias)}
    for e, lo, hi in _expert_rows(counts):
        c = channels[e]
        xe, we, be = _leaf(x[lo:hi, :c]), _leaf(weight[e, :c]), _leaf(bias[e, :c])
        want[e] = layernorm2d(xe, we, be, 1e-5, backend="reference")
        gx, gw, gb = torch.autograd.grad(want[e], [xe, we, be], grad_y[lo:hi, :c])
        expected["x"][lo:hi, :c], expected["weight"][e, :c], expected["bias"][e, :c] = gx, gw, gb
    # float32: the input gradient of a LayerNorm over 2 channels is ill-conditioned, and the two
    # sides sum in different orders; float64 holds the formula to 1e-10.
    atol, rtol = (5e-4, 1e-4) if dtype == torch.float32 else (1e-10, 1e-10)
    _check(y, got_grads, want, expected, channels, counts, atol, rtol)


# --- grouped_patch_fft_conv -----------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "counts", "height", "width"), LAYOUTS)
def test_grouped_patch_fft_conv_matches_per_expert_fft(channels, counts, height, width):
    patch_sizes = [4, 8, 4, 2][: len(channels)]  # two experts share a size: one FFT pass for both
    q = _leaf(_rows(channels, counts, height, width, seed=4))
    k = _leaf(_rows(channels, counts, height, width, seed=5))
    y = grouped_patch_fft_conv(q, k, _offsets(counts), list(channels), patch_sizes)
    assert y.dtype == torch.float32
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    got_grads = torch.autograd.grad(y, [q, k], grad_y, allow_unused=True)
    got_grads = [torch.zeros_like(q) if g is None else g for g in got_grads]  # N = 0

    want = {}
    expected = {"q": torch.zeros_like(q), "k": torch.zeros_like(k)}
    for e, lo, hi in _expert_rows(counts):
        c = channels[e]
        qe, ke = _leaf(q[lo:hi, :c]), _leaf(k[lo:hi, :c])
        want[e] = patch_fft_conv(qe, ke, patch_sizes[e], backend="reference")
        expected["q"][lo:hi, :c], expected["k"][lo:hi, :c] = torch.autograd.grad(
            want[e], [qe, ke], grad_y[lo:hi, :c]
        )
    _check(y, got_grads, want, expected, channels, counts, 1e-5, 1e-5)


# --- argument checks ------------------------------------------------------------------------------

_X = torch.zeros(3, 4, 2, 2)
_OFF = torch.tensor([0, 1, 3])
_W = torch.zeros(2, 5, 4)

BAD_CALLS = [
    pytest.param(
        lambda: grouped_pointwise(_X[0], _W, None, _OFF, [4, 4], [5, 5]),
        ValueError,
        "x must have 4",
        id="pw-x-rank",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W.double(), None, _OFF, [4, 4], [5, 5]),
        TypeError,
        "weight must have dtype",
        id="pw-w-dtype",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W[:, :, :3], None, _OFF, [4, 4], [5, 5]),
        ValueError,
        "weight must have shape",
        id="pw-w-shape",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, torch.zeros(2, 4), _OFF, [4, 4], [5, 5]),
        ValueError,
        "bias must have shape",
        id="pw-bias-shape",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, _OFF.float(), [4, 4], [5, 5]),
        TypeError,
        "offsets must have dtype",
        id="pw-off-dtype",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, torch.tensor([0, 3]), [4, 4], [5, 5]),
        ValueError,
        "offsets must have shape",
        id="pw-off-shape",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, torch.tensor([0, 2, 1]), [4, 4], [5, 5]),
        ValueError,
        "offsets must rise from 0 to N = 3",
        id="pw-off-decreasing",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, torch.tensor([0, 1, 2]), [4, 4], [5, 5]),
        ValueError,
        "offsets must rise from 0 to N = 3",
        id="pw-off-short",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, _OFF, [4, 5], [5, 5]),
        ValueError,
        r"in_channels\[1\] must be in 1..4",
        id="pw-cin-range",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, _OFF, [4], [5, 5]),
        ValueError,
        "in_channels must have E = 2",
        id="pw-cin-len",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, _OFF, [4, 4], [5, 0]),
        ValueError,
        r"out_channels\[1\] must be in 1..5",
        id="pw-cout-zero",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, _OFF, [4, 4.0], [5, 5]),
        TypeError,
        r"in_channels\[1\] must be an int",
        id="pw-cin-float",
    ),
    pytest.param(
        lambda: grouped_pointwise(_X, _W, None, _OFF, [4, 4], [5, 5], backend="gpu"),
        ValueError,
        "backend must be one of",
        id="pw-backend",
    ),
    pytest.param(
        lambda: grouped_layernorm2d(_X, torch.zeros(2, 3), torch.zeros(2, 4), _OFF, [4, 4]),
        ValueError,
        "weight must have shape",
        id="ln-w-shape",
    ),
    pytest.param(
        lambda: grouped_layernorm2d(_X, torch.zeros(2, 4), torch.zeros(2, 4), _OFF, [4, 4], 0.0),
        ValueError,
        "eps must be > 0",
        id="ln-eps",
    ),
    pytest.param(
        lambda: grouped_layernorm2d(_X, torch.zeros(2, 4), torch.zeros(2, 4), _OFF, [4, 4], "x"),
        TypeError,
        "eps must be a float",
        id="ln-eps-type",
    ),
    pytest.param(
        lambda: grouped_layernorm2d(_X, torch.zeros(2, 4), torch.zeros(2, 4), _OFF, [0, 4]),
        ValueError,
        r"channels\[0\] must be in 1..4",
        id="ln-channels",
    ),
    pytest.param(
        lambda: grouped_layernorm2d(_X, torch.zeros(2, 4), torch.zeros(2, 4), _OFF, [4, 4], gate=_X[:, :3]),
        ValueError,
        "gate must have shape",
        id="ln-gate-shape",
    ),
    pytest.param(
        lambda: grouped_layernorm2d(
            _X,
            torch.zeros(2, 4),
            torch.zeros(2, 4),
            _OFF,
            [4, 4],
            gate=torch.zeros(_X.shape, dtype=torch.int64),
        ),
        TypeError,
        "gate must have dtype in",
        id="ln-gate-dtype",
    ),
    pytest.param(
        lambda: grouped_patch_fft_conv(_X, _X[:, :3], _OFF, [4, 4], [4, 8]),
        ValueError,
        "k must have shape",
        id="fft-k-shape",
    ),
    pytest.param(
        lambda: grouped_patch_fft_conv(_X, _X, _OFF, [4, 4], [4]),
        ValueError,
        "patch_sizes must have E = 2",
        id="fft-patch-len",
    ),
    pytest.param(
        lambda: grouped_patch_fft_conv(_X, _X, _OFF, [4, 4], [4, 0]),
        ValueError,
        r"patch_sizes\[1\] must be an int >= 1",
        id="fft-patch-zero",
    ),
    pytest.param(
        lambda: grouped_patch_fft_conv(_X, _X, torch.tensor([0]), [], []),
        ValueError,
        "E \\+ 1 >= 2",
        id="fft-no-expert",
    ),
    pytest.param(
        lambda: grouped_patch_fft_conv(_X, _X, torch.tensor([1, 1, 3]), [4, 4], [4, 8]),
        ValueError,
        "offsets must rise",
        id="fft-off-start",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_CALLS)
def test_grouped_ops_reject_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_pack_pointwise_weights_rejects_missing_biases_and_empty_lists():
    with pytest.raises(ValueError, match="every expert or for none"):
        pack_pointwise_weights([torch.zeros(2, 3), torch.zeros(4, 3)], [torch.zeros(2), None])
    with pytest.raises(ValueError, match="at least one expert"):
        pack_pointwise_weights([])


def test_nan_in_one_experts_parameters_reaches_only_its_rows():
    """As with a per-expert loop: each row reads only its own expert's weights."""
    channels, counts, offsets = (3, 4), (2, 2), _offsets((2, 2))
    x = _rows(channels, counts, 3, 3)
    weight = torch.randn(2, 5, 4)
    weight[0, 0, 0] = math.nan  # an entry expert 0 uses
    y = grouped_pointwise(x, weight, torch.randn(2, 5), offsets, list(channels), [5, 5])
    assert y[:2].isnan().any() and not y[2:].isnan().any()
    ln_weight = torch.ones(2, 4)
    ln_weight[1, 0] = math.inf
    z = grouped_layernorm2d(x, ln_weight, torch.zeros(2, 4), offsets, list(channels))
    assert not z[:2].isnan().any() and not z[:2].isinf().any()
