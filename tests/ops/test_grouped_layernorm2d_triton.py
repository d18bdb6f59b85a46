"""grouped_layernorm2d on the Triton kernels: the interpreter on the CPU here, the GPU when there is one.

Forward and every gradient (x, weight, bias) against ``grouped_layernorm2d_reference`` (the Triton
side through the public function with ``backend="triton"``, so the plumbing runs too): experts
without rows (also every row on one expert), N = 0, B = 1, 5 x 7 and 1 x 1 planes, E = 1..4, widths
that are not multiples of any block, both kernel paths (the [C, BLOCK_P] tile in registers and the
chunked loop over C), several pixel tiles and backward chunks per row, plans from ``route``, mixed
parameter dtypes; NaN wherever an expert must not look (x's channels past its width, weight and
bias past it, grad y past it); exact zeros past each expert's channels; NaN-filled buffers;
determinism; float64 and gradcheck, ``opcheck``, torch.compile, and an ahead-of-time compile of
every kernel for sm_90 (registers and spills).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from moce_kernels import _backend
from moce_kernels.grouped_layernorm2d import grouped_layernorm2d, grouped_layernorm2d_reference
from tests.ops._helpers import (
    LAYERNORM_DTYPES,
    LAYOUTS,
    TRITON_DEVICE,
    aot_resource_usage,
    assert_close_scaled,
    misaligned,
    nan_filled_torch_empty,
    skip_unless_triton_usable,
)

skip_unless_triton_usable()

# Imported by path: ``moce_kernels.grouped_layernorm2d`` the attribute is the function, not the package.
gln_triton = importlib.import_module("moce_kernels.grouped_layernorm2d.triton")
grouped_layernorm2d_triton = gln_triton.grouped_layernorm2d_triton
# Block sizes and paths come from layernorm2d's ``_blocks``: the fixtures patch its constants.
ln_triton = importlib.import_module("moce_kernels.layernorm2d.triton")

#: The interpreter runs on CPU tensors; compiled Triton needs CUDA tensors.
DEVICE = TRITON_DEVICE

# (channels, rows per expert, H, W)
CASES = [
    pytest.param(((5, 37, 20), (2, 0, 3), 5, 7), id="E3-empty1-5x7"),
    pytest.param(((3, 2, 4, 1), (1, 1, 0, 1), 1, 1), id="E4-1x1"),
    pytest.param(((4, 7, 3), (0, 0, 3), 4, 4), id="all-rows-on-last-expert"),
    pytest.param(((2, 5, 3), (0, 2, 0), 3, 5), id="first-and-last-empty"),
    pytest.param(((6,), (1,), 5, 7), id="E1-B1"),
    pytest.param(((3, 4), (0, 0), 5, 6), id="N0"),
]
SHORT_CASES = [CASES[0], CASES[1]]

# (dtype, atol, rtol): layernorm2d's. atol is scaled per pixel by max(1, rstd) (its square for
# grad x) and for the parameter gradients by sqrt(rows * H * W) (see assert_matches_reference).
DTYPES = {param.id: param for param in LAYERNORM_DTYPES}
FP32_TOL = tuple(DTYPES["fp32"].values[1:])
#: (atol, rtol) of one rounding to each dtype, for gradients stored in a parameter's own dtype.
ROUNDING = {param.values[0]: param.values[1:] for param in LAYERNORM_DTYPES}


def make_case(channels, counts, height, width, *, dtype=torch.float32, param_dtype=None, seed=0):
    """Packed (x, weight, bias, offsets, channels) with NaN wherever an expert must not look:
    x's channels past its rows' expert's width, weight and bias entries past the expert's width.
    x is O(1..4), weight ~ 1 and bias ~ 0 in ``param_dtype`` (x's by default)."""
    g = torch.Generator().manual_seed(seed)
    num_experts, c_max = len(channels), max(channels)
    x = torch.randn(sum(counts), c_max, height, width, generator=g) * 2 + 0.5
    weight = torch.full((num_experts, c_max), math.nan)
    bias = torch.full((num_experts, c_max), math.nan)
    row = 0
    for e, (c, n) in enumerate(zip(channels, counts, strict=True)):
        weight[e, :c] = 1 + 0.5 * torch.randn(c, generator=g)
        bias[e, :c] = 0.5 * torch.randn(c, generator=g)
        x[row : row + n, c:] = math.nan
        row += n
    offsets = torch.tensor([0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()])
    params = dict(dtype=param_dtype or dtype, device=DEVICE)
    return (
        x.to(dtype=dtype, device=DEVICE),
        weight.to(**params),
        bias.to(**params),
        offsets.to(DEVICE),
        list(channels),
    )


def finite(case):
    """``case`` with its NaN garbage replaced by zeros (for gradcheck, opcheck)."""
    x, weight, bias, offsets, channels = case
    return x.nan_to_num(0.0), weight.nan_to_num(0.0), bias.nan_to_num(0.0), offsets, channels


def expert_rows(offsets, channels):
    """(expert, first row, end row, width) of every expert."""
    offs = offsets.tolist()
    return [(e, offs[e], offs[e + 1], c) for e, c in enumerate(channels)]


def grad_output(x, channels, offsets, *, seed=1, past=math.nan):
    """A random grad y in x's dtype with ``past`` (NaN by default) past each row's expert's
    channels: the output there is a constant zero, so the kernels must not read it."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype).to(x.device)
    for _, lo, hi, c in expert_rows(offsets, channels):
        g[lo:hi, c:] = past
    return g


def run(fn, x, weight, bias, offsets, channels, grad_out, eps=1e-5):
    """(out, grad x, grad weight, grad bias) of ``fn`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    out = fn(*leaves, offsets, channels, eps)
    return out, *torch.autograd.grad(out, leaves, grad_out)


def triton_public(x, weight, bias, offsets, channels, eps, gate=None):
    return grouped_layernorm2d(x, weight, bias, offsets, channels, eps, gate=gate, backend="triton")


def row_rstd(x, offsets, channels, eps):
    """[N, 1, H, W] float64: max(1, rstd) of each pixel over its row's expert's channels."""
    rstd = torch.ones(x.shape[0], 1, *x.shape[2:], dtype=torch.float64, device=x.device)
    for _, lo, hi, c in expert_rows(offsets, channels):
        if hi == lo:
            continue
        xe = x[lo:hi, :c].double()
        rstd[lo:hi] = (xe.var(1, unbiased=False, keepdim=True) + eps).rsqrt().clamp(min=1)
    return rstd


def assert_matches_reference(case, atol, rtol, fn=triton_public, eps=1e-5):
    """Output and the gradients of x, weight and bias of ``fn`` against the reference on the same
    values (grad y NaN past each expert's channels for ``fn``, zero for the reference, whose masked
    fill would turn NaN there into NaN gradients), plus the zeros of the contract."""
    x, weight, bias, offsets, channels = case
    got = run(fn, *case, grad_output(x, channels, offsets), eps)
    want = run(grouped_layernorm2d_reference, *case, grad_output(x, channels, offsets, past=0.0), eps)
    out = got[0]
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    rstd = row_rstd(x, offsets, channels, eps)
    root_pixels = math.sqrt(max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    scales = (rstd, rstd**2, root_pixels, root_pixels)
    for name, leaf, a, b, scale in zip(
        ("output", "grad x", "grad weight", "grad bias"), (x, x, weight, bias), got, want, scales, strict=True
    ):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert bool(a.isfinite().all()), f"{name} has NaN/Inf: a kernel read garbage or skipped an element"
        # A gradient is rounded to its leaf's dtype: the looser of that tolerance and x's.
        t_abs, t_rel = (max(p, q) for p, q in zip((atol, rtol), ROUNDING[leaf.dtype], strict=True))
        assert_close_scaled(a.double(), b.double(), t_abs, t_rel, scale, name)
    assert_zero_outside(case, *got)


def assert_zero_outside(case, out, grad_x, grad_w, grad_b):
    """Exact zeros past each expert's channels (output, grad x, grad weight, grad bias), and for
    every parameter gradient of an expert without rows."""
    _, _, _, offsets, channels = case
    for e, lo, hi, c in expert_rows(offsets, channels):
        assert bool((out[lo:hi, c:] == 0).all()), f"expert {e}: output past its channels"
        assert bool((grad_x[lo:hi, c:] == 0).all()), f"expert {e}: grad x past its channels"
        end = c if hi > lo else 0
        assert bool((grad_w[e, end:] == 0).all()), f"expert {e}: grad weight past its channels / rows"
        assert bool((grad_b[e, end:] == 0).all()), f"expert {e}: grad bias past its channels / rows"


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The interpreter with the GPU's tile sizes (it normally takes 8x larger tiles)."""
    monkeypatch.setattr(ln_triton, "_INTERPRETER_TILE_ELEMENTS", ln_triton._TILE_ELEMENTS)


@pytest.fixture
def small_chunks(monkeypatch, gpu_tiles):
    """The GPU's tiles and backward chunks of 2 tiles: several chunks per row, the last one short."""
    monkeypatch.setattr(gln_triton, "_BWD_PROGRAMS", 1)
    monkeypatch.setattr(gln_triton, "_MAX_CHUNK_TILES", 2)


@pytest.fixture
def loop_path(monkeypatch):
    """Force the chunked loop over C with 16-channel chunks (normally only for C_max > 512)."""
    monkeypatch.setattr(ln_triton, "_SINGLE_TILE_MAX_C", 8)
    monkeypatch.setattr(ln_triton, "_LOOP_BLOCK_C", 16)


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "atol", "rtol"), [DTYPES["fp32"], DTYPES["bf16"]])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, atol, rtol):
    assert_matches_reference(make_case(*case, dtype=dtype), atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), [DTYPES["fp16"], DTYPES["fp64"]])
@pytest.mark.parametrize("case", SHORT_CASES)
def test_matches_reference_fp16_fp64(case, dtype, atol, rtol):
    assert_matches_reference(make_case(*case, dtype=dtype), atol, rtol)


def test_model_ranks_match_reference():
    # The sync-free expert path: float32 FFT output, ranks C/8 .. C of a C = 96 level, one row
    # each (C_max = 96 in a 128-channel tile).
    assert_matches_reference(make_case((12, 24, 48, 96), (1, 1, 1, 1), 3, 5), *FP32_TOL)


def make_gate(x, channels, offsets, dtype, *, past=math.nan, seed=3):
    """A gate (the expert's v) in ``dtype`` with ``past`` (NaN by default) past each row's expert's
    channels, where the kernels must not read it."""
    gate = (torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype).to(x.device)
    for _, lo, hi, c in expert_rows(offsets, channels):
        gate[lo:hi, c:] = past
    return gate


def run_gated(fn, x, weight, bias, offsets, channels, gate, grad_out, eps=1e-5):
    """(out, grad x, grad weight, grad bias, grad gate) of ``fn(..., gate=gate)`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias, gate)]
    out = fn(*leaves[:3], offsets, channels, eps, gate=leaves[3])
    return out, *torch.autograd.grad(out, leaves, grad_out)


def assert_gated_matches_reference(case, gate_dtype, atol, rtol):
    """``LN(x) * gate`` (the expert's normed * v) and all five gradients against the reference,
    with NaN in the gate and grad y past each expert's channels for the kernels (zeros for the
    reference, whose masked fill would turn NaN there into NaN gradients)."""
    x, weight, bias, offsets, channels = case
    gate = make_gate(x, channels, offsets, gate_dtype)
    grad_y = grad_output(x, channels, offsets).to(gate_dtype)
    got = run_gated(triton_public, *case, gate, grad_y)
    want = run_gated(
        grouped_layernorm2d_reference,
        *case,
        make_gate(x, channels, offsets, gate_dtype, past=0.0),
        grad_output(x, channels, offsets, past=0.0).to(gate_dtype),
    )
    assert got[0].dtype == gate_dtype and got[0].shape == x.shape and got[0].is_contiguous()
    rstd = row_rstd(x, offsets, channels, 1e-5)
    root_pixels = math.sqrt(max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    # The gate is O(1): the output and grad x scale as without it, grad gate as the LN output.
    scales = (rstd, rstd**2, root_pixels, root_pixels, rstd)
    names = ("output", "grad x", "grad weight", "grad bias", "grad gate")
    dtypes = (gate_dtype, x.dtype, weight.dtype, bias.dtype, gate_dtype)
    for name, dtype, a, b, scale in zip(names, dtypes, got, want, scales, strict=True):
        assert a.dtype == dtype, name
        assert bool(a.isfinite().all()), f"{name} has NaN/Inf: a kernel read garbage or skipped an element"
        t_abs, t_rel = (max(p, q) for p, q in zip((atol, rtol), ROUNDING[dtype], strict=True))
        assert_close_scaled(a.double(), b.double(), t_abs, t_rel, scale, name)
    assert_zero_outside(case, *got[:4])
    for e, lo, hi, c in expert_rows(offsets, channels):
        assert bool((got[4][lo:hi, c:] == 0).all()), f"expert {e}: grad gate past its channels"


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float32], ids=["bf16-gate", "fp32-gate"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]])
def test_gated_matches_reference(case, gate_dtype):
    # float32 x (the FFT product) times v in the model's dtype.
    assert_gated_matches_reference(make_case(*case), gate_dtype, *FP32_TOL)


def test_gated_model_ranks_match_reference():
    assert_gated_matches_reference(make_case((12, 24, 48, 96), (1, 1, 1, 1), 3, 5), torch.bfloat16, *FP32_TOL)


@pytest.mark.parametrize(
    "path", [pytest.param("small_chunks", id="gpu-tiles-chunks"), pytest.param("loop_path", id="loop")]
)
def test_gated_paths_match_reference(path, request):
    request.getfixturevalue(path)
    assert_gated_matches_reference(make_case((5, 37, 20), (2, 1, 1), 17, 19), torch.bfloat16, *FP32_TOL)


def test_gated_equals_layernorm_times_gate():
    """The fused product is ``(LN(x) * gate).to(gate.dtype)`` of the unfused ops (float32 x, one
    rounding to bf16): at most one bf16 rounding apart."""
    x, weight, bias, offsets, channels = make_case((5, 9), (2, 1), 4, 6)
    gate = make_gate(x, channels, offsets, torch.bfloat16, past=0.0)
    x = x.nan_to_num(0.0)
    fused = grouped_layernorm2d(x, weight, bias, offsets, channels, 1e-5, gate=gate, backend="triton")
    unfused = grouped_layernorm2d(x, weight, bias, offsets, channels, 1e-5, backend="triton") * gate
    torch.testing.assert_close(fused.float(), unfused.to(torch.bfloat16).float(), atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize(
    "path",
    [
        # 17 x 19 pixels in 11 tiles of 32 (BLOCK_C 64), backward chunks of 2 tiles (5 + a short one).
        pytest.param("small_chunks", id="gpu-tiles-chunks"),
        # Expert widths 5, 37, 20 over 16-channel chunks: 1, 3 and 2 chunks, the last ones partial.
        pytest.param("loop_path", id="loop"),
    ],
)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [DTYPES["fp32"], DTYPES["bf16"]])
def test_paths_match_reference(path, dtype, atol, rtol, request):
    request.getfixturevalue(path)
    block_c, block_p, single, _ = ln_triton._blocks(37, 17 * 19)
    if path == "loop_path":
        assert not single and block_c == 16
    else:
        assert single and block_p == 32
        assert gln_triton._chunk_len(4, 17 * 19, block_c, block_p, single) == 64
    assert_matches_reference(make_case((5, 37, 20), (2, 1, 1), 17, 19, dtype=dtype), atol, rtol)


@pytest.mark.parametrize(
    ("dtype", "param_dtype"),
    [
        # Float32 activations with bf16 parameters (a bf16 model's experts on the FFT output),
        # and bf16 activations with float32 parameters.
        pytest.param(torch.float32, torch.bfloat16, id="fp32-x-bf16-params"),
        pytest.param(torch.bfloat16, torch.float32, id="bf16-x-fp32-params"),
    ],
)
def test_params_in_another_dtype(dtype, param_dtype):
    case = make_case((5, 9, 3), (1, 2, 1), 5, 7, dtype=dtype, param_dtype=param_dtype)
    assert_matches_reference(case, *ROUNDING[dtype])


@pytest.mark.parametrize(("batch", "k"), [pytest.param(1, 1, id="B1-k1"), pytest.param(3, 2, id="B3-k2")])
def test_rows_from_route(batch, k, make_routing):
    # Packed rows as a routing plan lays them out: each image on k of E = 4 experts.
    _, plan = make_routing(batch, 4, k, "some_empty", seed=k)
    x, weight, bias, _, channels = make_case((6, 3, 2, 5), plan.counts.tolist(), 3, 4)
    assert_matches_reference((x, weight, bias, plan.offsets.to(DEVICE), channels), *FP32_TOL)


@pytest.mark.parametrize("eps", [pytest.param(1e-6, id="eps1e-6"), pytest.param(1e-2, id="eps1e-2")])
def test_other_eps(eps):
    # Few channels and a small spread make eps matter.
    x, weight, bias, offsets, channels = make_case((3, 2), (1, 1), 5, 7)
    assert_matches_reference((x * 0.05, weight, bias, offsets, channels), *FP32_TOL, eps=eps)


@pytest.mark.parametrize("path", [pytest.param("tile", id="tile"), pytest.param("loop", id="loop")])
def test_large_mean_small_spread(path, request):
    # |mean| = 300 >> std = 0.02: E[x^2] - E[x]^2 in float32 would lose every digit of the variance.
    # Against float64 statistics of the same float32 values, over each row's expert's channels.
    if path == "loop":
        request.getfixturevalue("loop_path")
    g = torch.Generator().manual_seed(5)
    channels, offsets = [40, 23], torch.tensor([0, 1, 3], device=DEVICE)
    x = (300 + 0.02 * torch.randn(3, 40, 3, 4, generator=g)).to(DEVICE)
    weight, bias = torch.ones(2, 40, device=DEVICE), torch.zeros(2, 40, device=DEVICE)
    _, mean, rstd = torch.ops.moce_triton.grouped_layernorm2d_fwd(x, weight, bias, offsets, channels, 1e-5)
    for _, lo, hi, c in expert_rows(offsets, channels):
        xd = x[lo:hi, :c].double()
        torch.testing.assert_close(mean[lo:hi].double(), xd.mean(1), atol=3.1e-5, rtol=0)  # an ulp at 300
        want = (xd.var(1, unbiased=False) + 1e-5).rsqrt()
        torch.testing.assert_close(rstd[lo:hi].double(), want, atol=0, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_or_misaligned_input(layout):
    x, weight, bias, offsets, channels = make_case((3, 5), (1, 2), 6, 8)
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        x_in = wide[..., ::2]
    else:
        x_in = misaligned(x)
    got = grouped_layernorm2d(x_in, weight, bias, offsets, channels, backend="triton")
    want = grouped_layernorm2d(x, weight, bias, offsets, channels, backend="triton")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_int32_offsets_and_direct_call():
    x, weight, bias, offsets, channels = make_case((2, 3), (2, 1), 4, 5)
    case = (x, weight, bias, offsets.to(torch.int32), channels)
    assert_matches_reference(case, *FP32_TOL, fn=grouped_layernorm2d_triton)


@pytest.mark.parametrize("path", [pytest.param(None, id="tile"), pytest.param("loop_path", id="loop")])
def test_nan_stays_in_its_pixel_and_channels(path, request):
    # A NaN in one of an expert's channels reaches only that pixel's channels of that expert, in
    # the output and in grad x: past them both stay exact zeros (the reference's output would be
    # NaN there).
    if path is not None:
        request.getfixturevalue(path)
    # C_max 12: the loop path's 16-channel chunks (one, expert 1's 10 channels and 2 past them).
    x, weight, bias, offsets, channels = make_case((12, 10), (1, 2), 5, 8)
    x[1, 1, 3, 4] = math.nan
    x.requires_grad_(True)
    out = grouped_layernorm2d_triton(x, weight, bias, offsets, channels, 1e-5)
    (grad_x,) = torch.autograd.grad(out, x, grad_output(x, channels, offsets))
    nan_mask = torch.zeros(out.shape, dtype=torch.bool)
    nan_mask[1, :10, 3, 4] = True
    for name, t in (("output", out.detach().cpu()), ("grad x", grad_x.cpu())):
        assert bool(t[nan_mask].isnan().all()), name
        assert bool(t[~nan_mask].isfinite().all()), name
        assert bool((t[1:, 10:] == 0).all()), name


def test_constant_pixel_gives_bias():
    x, weight, bias, offsets, channels = make_case((4, 2), (1, 1), 2, 3)
    x[:, :] = 3.25
    out = grouped_layernorm2d_triton(x, weight, bias, offsets, channels, 1e-5)
    want = bias.nan_to_num(0.0)[:, :, None, None].expand_as(x)
    torch.testing.assert_close(out, want, atol=0, rtol=0)


# --- buffers, determinism -----------------------------------------------------------------------


def _fwd_bwd(x, weight, bias, offsets, channels, gate=None):
    y, mean, rstd = torch.ops.moce_triton.grouped_layernorm2d_fwd(
        x, weight, bias, offsets, channels, 1e-5, gate
    )
    grad_y = grad_output(x, channels, offsets, seed=2)
    grads = torch.ops.moce_triton.grouped_layernorm2d_bwd(
        grad_y, x, weight, offsets, mean, rstd, channels, gate, None if gate is None else bias
    )
    return (y, mean, rstd, *grads)


@pytest.mark.parametrize(
    ("case", "path"),
    [
        pytest.param(((5, 37, 20), (2, 0, 3), 5, 7), None, id="tile-E3-empty1-5x7"),
        pytest.param(((2, 1), (1, 1), 1, 1), None, id="tile-1x1"),
        pytest.param(((5, 37, 20), (1, 1, 2), 17, 19), "small_chunks", id="gpu-tiles-chunks"),
        pytest.param(((5, 37, 20), (2, 0, 2), 5, 7), "loop_path", id="loop"),
    ],
)
def test_every_element_is_written(case, path, request):
    """With every torch.empty NaN-filled (outputs, statistics, partial sums, gradients), the
    results are the same bits as with the normal buffers: every element written, no partial sum
    read that was not written."""
    if path is not None:
        request.getfixturevalue(path)
    args = make_case(*case)
    # Without a gate (its grad is an empty placeholder) and with one (NaN past the channels).
    for gate in (None, make_gate(args[0], args[4], args[3], torch.float32)):
        want = _fwd_bwd(*args, gate)
        with nan_filled_torch_empty():
            got = _fwd_bwd(*args, gate)
        names = ("y", "mean", "rstd", "grad x", "grad w", "grad b", "grad gate")
        for name, a, b in zip(names, got, want, strict=True):
            assert not bool(a.isnan().any()), f"{name}: an element was not written (gate: {gate is not None})"
            assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_backward_is_deterministic(dtype, small_chunks):
    # Several rows per expert, each in 6 chunks: the reduction sums 12 / 18 partials per channel.
    case = make_case((5, 37, 20), (2, 0, 3), 17, 19, dtype=dtype)
    grad_out = grad_output(case[0], case[4], case[3], seed=3)
    first = run(grouped_layernorm2d_triton, *case, grad_out)
    second = run(grouped_layernorm2d_triton, *case, grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("counts", "height"), [pytest.param((0, 0), 5, id="N0"), pytest.param((1, 2), 0, id="H0")]
)
def test_empty_input_gives_zero_param_grads(counts, height):
    x, weight, bias, offsets, channels = make_case((3, 4), counts, height, 6)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias)]
    out = grouped_layernorm2d_triton(*leaves, offsets, channels, 1e-5)
    assert out.shape == x.shape
    grad_x, grad_w, grad_b = torch.autograd.grad(out.sum(), leaves)
    assert grad_x.shape == x.shape
    assert torch.equal(grad_w, torch.zeros_like(weight)) and torch.equal(grad_b, torch.zeros_like(bias))


def test_metadata_is_cached():
    # One host-to-device copy per configuration, not per call (CUDA-graph capture, no sync).
    assert gln_triton._expert_meta([3, 5], torch.device(DEVICE)) is gln_triton._expert_meta(
        [3, 5], torch.device(DEVICE)
    )


# --- the ops: statistics, gradcheck, opcheck, torch.compile ------------------------------------


@pytest.mark.parametrize(
    ("dtype", "stats_dtype"),
    [
        pytest.param(torch.float32, torch.float32, id="fp32"),
        pytest.param(torch.float64, torch.float64, id="fp64"),
        pytest.param(torch.bfloat16, torch.float32, id="bf16"),
    ],
)
def test_fwd_op_statistics(dtype, stats_dtype):
    x, weight, bias, offsets, channels = make_case((9, 4), (1, 2), 5, 7, dtype=dtype)
    y, mean, rstd = torch.ops.moce_triton.grouped_layernorm2d_fwd(x, weight, bias, offsets, channels, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert mean.shape == rstd.shape == (3, 5, 7)
    assert mean.dtype == rstd.dtype == stats_dtype
    # fp64: rsqrt on a GPU and torch's differ in the last bits (4.6e-12 measured on an H100).
    tol = 1e-10 if stats_dtype == torch.float64 else 1e-5
    for _, lo, hi, c in expert_rows(offsets, channels):
        xs = x[lo:hi, :c].to(stats_dtype)
        torch.testing.assert_close(mean[lo:hi], xs.mean(1), atol=tol, rtol=tol)
        want = (xs.var(1, unbiased=False) + 1e-5).rsqrt()
        torch.testing.assert_close(rstd[lo:hi], want, atol=tol, rtol=tol)


def test_bwd_op_output_dtypes():
    x, weight, bias, offsets, channels = make_case(
        (6, 2), (1, 1), 3, 5, dtype=torch.bfloat16, param_dtype=torch.float32
    )
    _, mean, rstd = torch.ops.moce_triton.grouped_layernorm2d_fwd(x, weight, bias, offsets, channels, 1e-5)
    grads = torch.ops.moce_triton.grouped_layernorm2d_bwd(
        torch.ones_like(x), x, weight, offsets, mean, rstd, channels
    )
    grad_x, grad_w, grad_b, grad_gate = grads
    assert grad_gate.numel() == 0  # no gate: an empty placeholder
    assert grad_x.dtype == torch.bfloat16 and grad_x.shape == x.shape
    assert grad_w.dtype == grad_b.dtype == torch.float32 and grad_w.shape == grad_b.shape == (2, 6)
    # grad bias is the sum of grad y over each expert's rows and pixels, on its channels.
    want = torch.zeros(2, 6, device=DEVICE)
    want[0, :6], want[1, :2] = 15, 15
    torch.testing.assert_close(grad_b, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("case", "path"),
    [
        pytest.param(((3, 1, 2), (1, 1, 1), 2, 3), None, id="tile-E3"),
        pytest.param(((20, 5), (1, 1), 2, 1), "loop_path", id="loop"),
    ],
)
def test_gradcheck(case, path, request):
    if path is not None:
        request.getfixturevalue(path)
    x, weight, bias, offsets, channels = make_case(*case, dtype=torch.float64)
    # Finite garbage: gradcheck perturbs every element, also the ones the op ignores.
    leaves = [t.nan_to_num(3.0).requires_grad_(True) for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda a, w, b: grouped_layernorm2d_triton(a, w, b, offsets, channels, 1e-5), leaves, fast_mode=True
    )


@pytest.mark.parametrize("path", [pytest.param(None, id="tile"), pytest.param("loop_path", id="loop")])
def test_gated_gradcheck(path, request):
    if path is not None:
        request.getfixturevalue(path)
    x, weight, bias, offsets, channels = make_case((20, 5), (1, 1), 2, 2, dtype=torch.float64)
    gate = make_gate(x, channels, offsets, torch.float64, past=3.0)
    leaves = [t.nan_to_num(3.0).requires_grad_(True) for t in (x, weight, bias, gate)]
    assert torch.autograd.gradcheck(
        lambda a, w, b, v: grouped_layernorm2d_triton(a, w, b, offsets, channels, 1e-5, v),
        leaves,
        fast_mode=True,
    )


@pytest.mark.parametrize(
    ("dtype", "requires_grad"),
    [
        pytest.param(torch.float32, True, id="fp32-grad"),
        pytest.param(torch.bfloat16, False, id="bf16"),
    ],
)
def test_opcheck(dtype, requires_grad):
    # Every default opcheck sub-test (test_schema, test_autograd_registration, test_faketensor,
    # test_aot_dispatch_dynamic) passes under the interpreter: the ops are custom_op + register_fake.
    x, weight, bias, offsets, channels = finite(make_case((2, 3), (1, 1), 3, 4, dtype=dtype))
    args = [t.requires_grad_(requires_grad) for t in (x, weight, bias)]
    torch.library.opcheck(
        torch.ops.moce_triton.grouped_layernorm2d_fwd.default, (*args, offsets, channels, 1e-5)
    )
    y, mean, rstd = torch.ops.moce_triton.grouped_layernorm2d_fwd(
        x.detach(), weight.detach(), bias.detach(), offsets, channels, 1e-5
    )
    bwd_args = (torch.randn_like(y), x.detach(), weight.detach(), offsets, mean, rstd, channels)
    torch.library.opcheck(torch.ops.moce_triton.grouped_layernorm2d_bwd.default, bwd_args)
    # With a gate (the expert's v, here in bf16): its own gradient and output dtype.
    gate = torch.randn(x.shape, dtype=torch.bfloat16).requires_grad_(requires_grad)
    torch.library.opcheck(
        torch.ops.moce_triton.grouped_layernorm2d_fwd.default, (*args, offsets, channels, 1e-5, gate)
    )
    bwd_gated = (*bwd_args, gate.detach(), bias.detach())
    torch.library.opcheck(torch.ops.moce_triton.grouped_layernorm2d_bwd.default, bwd_gated)


def test_torch_compile_fullgraph():
    x, weight, bias, offsets, channels = finite(make_case((2, 3), (1, 1), 4, 5))
    leaves = [t.requires_grad_(True) for t in (x, weight, bias)]

    def fn(a, w, b):
        return grouped_layernorm2d_triton(a, w, b, offsets, channels, 1e-5)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, want = compiled(*leaves), fn(*leaves)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_double_backward_raises():
    x, weight, bias, offsets, channels = finite(make_case((3,), (1,), 2, 2, dtype=torch.float64))
    x.requires_grad_(True)
    out = grouped_layernorm2d_triton(x, weight, bias, offsets, channels, 1e-5)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    module = importlib.reload(gln_triton)  # would raise if the ops were defined twice
    case = make_case((2, 3), (1, 1), 3, 4)
    assert_matches_reference(case, *FP32_TOL, fn=module.grouped_layernorm2d_triton)


def test_module_exports_the_convention_name():
    assert _backend.implementation("grouped_layernorm2d", "triton").__name__ == "grouped_layernorm2d_triton"


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [DTYPES["fp32"], DTYPES["bf16"]])
def test_gpu_moce_ir_s_expert_shapes(dtype, atol, rtol):
    # The sync-free expert path at 128 x 128 (batch 8, k = 1): ranks 12, 24, 48, 96, the spread
    # a complexity-biased router gives; several chunks per row in the backward.
    assert_matches_reference(make_case((12, 24, 48, 96), (3, 2, 2, 1), 128, 128, dtype=dtype), atol, rtol)


# --- ahead-of-time compile for sm_90 ------------------------------------------------------------

#: Compiles every kernel for sm_90 with the block sizes and warps the launchers pick on a GPU
#: (layernorm2d's ``_blocks`` without the interpreter) and prints one JSON line per kernel with
#: its resource usage (``cuobjdump -res-usage``: registers, stack and local memory, where spills
#: go). Exits 3 without Triton's ahead-of-time API (the test skips).
AOT_BODY = """
    from moce_kernels.grouped_layernorm2d import triton as gln
    from moce_kernels.layernorm2d import triton as ln

    # (label, x dtype, parameter dtype, C_max, rows, pixels, offsets): the model's ranks up to 96
    # at 128 x 128 (float32 FFT output; the backward loops over pixel tiles), bf16 activations,
    # C_max 256 (the widest tile whose backward loops), MoCE-IR's latent width 384 (16 warps,
    # one tile per backward program), C_max > 512 (the chunked loop over C), float64 (gradcheck).
    # The gated ones (LN(x) * gate): the sync-free expert path's float32 FFT output times v in
    # bf16, on the register tile and on the chunked loop.
    for label, xt, pt, c_max, rows, pixels, offsets, gt in (
        ("c96-fp32", "fp32", "fp32", 96, 8, 128 * 128, "*i64", None),
        ("c96-fp32-bf16-params", "fp32", "bf16", 96, 8, 128 * 128, "*i32", None),
        ("c96-bf16", "bf16", "bf16", 96, 8, 128 * 128, "*i64", None),
        ("c256-fp32", "fp32", "fp32", 256, 8, 64 * 64, "*i64", None),
        ("c384-bf16", "bf16", "fp32", 384, 8, 16 * 16, "*i64", None),
        ("c384-fp32", "fp32", "fp32", 384, 8, 16 * 16, "*i64", None),
        ("c600-loop-fp32", "fp32", "fp32", 600, 8, 32 * 32, "*i64", None),
        ("c96-fp64", "fp64", "fp64", 96, 8, 64 * 64, "*i64", None),
        ("c96-fp32-gate-bf16", "fp32", "bf16", 96, 8, 128 * 128, "*i64", "bf16"),
        ("c600-loop-fp32-gate-bf16", "fp32", "fp32", 600, 8, 32 * 32, "*i64", "bf16"),
    ):
        block_c, block_p, single, warps = ln._blocks(c_max, pixels)
        loop_tiles = gln._chunk_len(rows, pixels, block_c, block_p, single) > block_p
        assert loop_tiles == (single and c_max <= 256), label
        acc = "fp64" if xt == "fp64" else "fp32"
        x, p, a = "*" + xt, "*" + pt, "*" + acc
        acc_tl = tl.float64 if acc == "fp64" else tl.float32
        g = x if gt is None else "*" + gt  # the gate, the output and grad y (the gate's dtype)
        consts = dict(BLOCK_E=4, BLOCK_C=block_c, BLOCK_P=block_p, SINGLE_TILE=single,
                      HAS_GATE=gt is not None, ACC=acc_tl)
        fwd = dict(x_ptr=x, w_ptr=p, b_ptr=p, off_ptr=offsets, meta_ptr="*i32", gate_ptr=g, y_ptr=g,
                   mean_ptr=a, rstd_ptr=a, C_MAX="i32", HW="i32", E="i32", TILES="i32", eps="fp32")
        compile_(f"fwd-{label}", gln.grouped_layernorm2d_fwd_kernel, fwd, consts, warps)
        bwd = dict(gy_ptr=g, x_ptr=x, w_ptr=p, b_ptr=p, gate_ptr=g, off_ptr=offsets, meta_ptr="*i32",
                   mean_ptr=a, rstd_ptr=a, gx_ptr=x, gg_ptr=g, part_w_ptr=a, part_b_ptr=a, C_MAX="i32",
                   HW="i32", E="i32", chunk_len="i32", CHUNKS="i32")
        compile_(f"bwd-{label}", gln.grouped_layernorm2d_bwd_kernel, bwd, dict(consts, LOOP_TILES=loop_tiles),
                 warps)
        red = dict(part_w_ptr=a, part_b_ptr=a, off_ptr=offsets, meta_ptr="*i32", gw_ptr=p, gb_ptr=p,
                   C_MAX="i32", chunks="i32", c_blocks="i32")
        reduce_consts = dict(BLOCK_R=gln._REDUCE_BLOCK_R, BLOCK_C=min(gln._REDUCE_BLOCK_C, block_c),
                             ACC=acc_tl)
        compile_(f"reduce-{label}", gln.grouped_layernorm2d_reduce_kernel, red, reduce_consts, 4)
    """


def test_aot_compile_sm90():
    """Compile every kernel for sm_90 (Triton's own compiler and ptxas, no GPU needed): catches
    what the interpreter forgives (constexpr misuse, dtype mismatches in loops and branches), and
    checks that none spills. Runs in a subprocess without TRITON_INTERPRET. Prints the registers
    per thread (``pytest -s``)."""
    results = aot_resource_usage(AOT_BODY)
    assert len(results) == 30
    for r in results:
        print(r)
        if "STACK" in r:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
