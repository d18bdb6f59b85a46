"""grouped_pointwise on the Triton kernels: the interpreter on the CPU here, the GPU when there is one.

Forward and every gradient (x, weight, bias) against ``grouped_pointwise_reference`` (the Triton side
through the public function with ``backend="triton"``, so the plumbing runs too): experts without
rows (also every row on one expert), N = 0, B = 1, 5 x 7 and 1 x 1 planes, E = 1..4, widths that
are not multiples of any block, tiles and pixel chunks forced small so that every loop runs several
times, plans from ``route``; NaN wherever an expert must not look; exact zeros outside each expert's
channels and (out, in) block; NaN-filled buffers; determinism; float64 and gradcheck, ``opcheck``,
torch.compile, and an ahead-of-time compile of every kernel for sm_90 (registers and spills).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from moce_kernels import _backend
from moce_kernels.grouped_pointwise import grouped_pointwise, grouped_pointwise_reference
from tests.ops._helpers import TRITON_DEVICE, aot_resource_usage, skip_unless_triton_usable

skip_unless_triton_usable()

# Imported by path: ``moce_kernels.grouped_pointwise`` the attribute is the function, not the package.
pw_triton = importlib.import_module("moce_kernels.grouped_pointwise.triton")
grouped_pointwise_triton = pw_triton.grouped_pointwise_triton

#: The interpreter runs on CPU tensors; compiled Triton needs CUDA tensors.
DEVICE = TRITON_DEVICE

# (in_channels, out_channels, rows per expert, H, W)
CASES = [
    pytest.param(((5, 37, 20), (40, 3, 17), (2, 0, 3), 5, 7), id="E3-empty1-5x7"),
    pytest.param(((3, 2, 4, 1), (1, 4, 2, 3), (1, 1, 0, 1), 1, 1), id="E4-1x1"),
    pytest.param(((4, 7, 3), (6, 2, 5), (0, 0, 3), 4, 4), id="all-rows-on-last-expert"),
    pytest.param(((2, 5, 3), (4, 1, 6), (0, 2, 0), 3, 5), id="first-and-last-empty"),
    pytest.param(((6,), (9,), (1,), 5, 7), id="E1-B1"),
    pytest.param(((3, 4), (5, 2), (0, 0), 5, 6), id="N0"),
]
FP16_CASES = [CASES[0], CASES[1]]

# (dtype, atol, rtol): the expectation is the reference in float32 on the same (rounded) values,
# so the kernels differ from it by float32 rounding (a different order of the sums) plus, for
# bf16 / fp16, one rounding of the result to the dtype (eps 7.8e-3 / 9.8e-4; values O(1..5)).
# Weight / bias gradients sum over rows * H * W terms: their atol grows with the square root of
# that count.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1.6e-2, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]
FP32_TOL = (1e-5, 1e-5)


def make_case(in_channels, out_channels, counts, height, width, *, dtype=torch.float32, bias=True, seed=0):
    """Packed (x, weight, bias, offsets, in_channels, out_channels) with NaN wherever an expert
    must not look: x's channels past its rows' expert's input width, weight entries outside the
    expert's (out, in) block, bias entries past its output width. Reading any poisons the result.
    """
    g = torch.Generator().manual_seed(seed)
    num_experts, c_in, c_out = len(in_channels), max(in_channels), max(out_channels)
    weight = torch.full((num_experts, c_out, c_in), math.nan)
    packed_bias = torch.full((num_experts, c_out), math.nan) if bias else None
    x = torch.randn(sum(counts), c_in, height, width, generator=g)
    row = 0
    for e, (i, o, n) in enumerate(zip(in_channels, out_channels, counts, strict=True)):
        weight[e, :o, :i] = torch.randn(o, i, generator=g) / math.sqrt(i)
        if packed_bias is not None:
            packed_bias[e, :o] = torch.randn(o, generator=g)
        x[row : row + n, i:] = math.nan
        row += n
    offsets = torch.tensor([0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()])
    to = dict(dtype=dtype, device=DEVICE)
    return (
        x.to(**to),
        weight.to(**to),
        None if packed_bias is None else packed_bias.to(**to),
        offsets.to(DEVICE),
        list(in_channels),
        list(out_channels),
    )


def finite(case):
    """``case`` with its NaN garbage replaced by zeros (for gradcheck, opcheck, the reference)."""
    x, weight, bias, offsets, in_channels, out_channels = case
    bias = None if bias is None else bias.nan_to_num(0.0)
    return x.nan_to_num(0.0), weight.nan_to_num(0.0), bias, offsets, in_channels, out_channels


def run(fn, x, weight, bias, offsets, in_channels, out_channels, grad_out):
    """(out, grad x, grad weight, grad bias or None) of ``fn`` on fresh leaves."""
    leaves = [
        t.detach().clone().requires_grad_(True) for t in (x, weight) + ((bias,) if bias is not None else ())
    ]
    b = leaves[2] if bias is not None else None
    out = fn(leaves[0], leaves[1], b, offsets, in_channels, out_channels)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, *grads, *((None,) if bias is None else ())


def triton_public(x, weight, bias, offsets, in_channels, out_channels):
    return grouped_pointwise(x, weight, bias, offsets, in_channels, out_channels, backend="triton")


def reference_acc(x, weight, bias, offsets, in_channels, out_channels):
    """The reference in float32 (float64 for float64) on the same values, NaN garbage zeroed: the
    reference masks weight and bias by multiplying (NaN * 0 is NaN), the kernels by not loading."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, weight, bias = (None if t is None else t.to(acc) for t in (x, weight, bias))
    x, weight, bias, *_ = finite((x, weight, bias, offsets, in_channels, out_channels))
    return grouped_pointwise_reference(x, weight, bias, offsets, in_channels, out_channels)


def assert_matches_reference(case, atol, rtol, fn=triton_public):
    x, weight, bias, offsets, in_channels, out_channels = case
    out_shape = (x.shape[0], weight.shape[1], *x.shape[2:])
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(DEVICE)
    got = run(fn, *case, grad_out)
    want = run(reference_acc, *case, grad_out)
    out, grad_x, grad_w, grad_b = got
    assert out.dtype == x.dtype and out.shape == out_shape and out.is_contiguous()
    assert grad_x.dtype == x.dtype and grad_x.shape == x.shape
    assert grad_w.dtype == weight.dtype and grad_w.shape == weight.shape
    terms = math.sqrt(max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    tolerances = ((atol, rtol), (atol, rtol), (atol * terms, rtol), (atol * terms, rtol))
    for name, a, b, (t_abs, t_rel) in zip(
        ("output", "grad x", "grad w", "grad b"), got, want, tolerances, strict=True
    ):
        if a is None:
            continue
        assert bool(a.isfinite().all()), f"{name} has NaN/Inf: a kernel read garbage or skipped an element"
        torch.testing.assert_close(a.double(), b.double(), atol=t_abs, rtol=t_rel, msg=name)
    assert_zero_outside(case, out, grad_x, grad_w, grad_b)


def assert_zero_outside(case, out, grad_x, grad_w, grad_b):
    """Exact zeros past each expert's output channels (output) and input channels (grad x),
    outside its (out, in) block (grad weight, grad bias), and for every parameter of an expert
    without rows."""
    _, weight, _, offsets, in_channels, out_channels = case
    offs = offsets.tolist()
    for e, (i, o) in enumerate(zip(in_channels, out_channels, strict=True)):
        lo, hi = offs[e], offs[e + 1]
        assert bool((out[lo:hi, o:] == 0).all()), f"expert {e}: output past its channels"
        assert bool((grad_x[lo:hi, i:] == 0).all()), f"expert {e}: grad x past its channels"
        inside = torch.zeros(weight.shape[1:], dtype=torch.bool, device=weight.device)
        inside[:o, :i] = hi > lo
        assert bool((grad_w[e][~inside] == 0).all()), f"expert {e}: grad w outside its block"
        if grad_b is not None:
            assert bool((grad_b[e, o:] == 0).all()), f"expert {e}: grad b past its channels"
            if hi == lo:
                assert bool((grad_b[e] == 0).all()), f"expert {e} has no rows: grad b must be 0"


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide tiles everywhere and 16-pixel chunks, at most 2 per row: several channel tiles,
    input-channel steps, pixel tiles and chunks (clamped to the maximum) on small cases."""
    monkeypatch.setattr(pw_triton, "_limits", lambda dtype: (16, 16, 16, 16, 16))
    monkeypatch.setattr(pw_triton, "_CHUNK_PIXELS", 16)
    monkeypatch.setattr(pw_triton, "_MAX_CHUNKS", 2)


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The interpreter with the GPU's block sizes (it normally takes bigger tiles)."""
    gpu = (pw_triton._BLOCK_M, pw_triton._BLOCK_K, pw_triton._BLOCK_P, pw_triton._WEIGHT_BLOCK_P, 16)
    monkeypatch.setattr(pw_triton, "_limits", lambda dtype: gpu)


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES[:2])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, atol, rtol):
    assert_matches_reference(make_case(*case, dtype=dtype), atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES[2:])
@pytest.mark.parametrize("case", FP16_CASES)
def test_matches_reference_fp16(case, dtype, atol, rtol):
    assert_matches_reference(make_case(*case, dtype=dtype), atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES[:2])
def test_without_bias(dtype, atol, rtol):
    assert_matches_reference(make_case(*CASES[0].values[0], dtype=dtype, bias=False), atol, rtol)


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")],
)
def test_small_blocks_match_reference(dtype, small_blocks):
    # Cout_max 40 / Cin_max 37 over 16-wide tiles (expert 1 reads 37 channels in 3 steps; expert 0
    # writes 3 output tiles, expert 1's second and third are wholly past its 3 channels), 35
    # pixels over 3 tiles, and 3 chunks of 16 pixels clamped to 2 of 32.
    params = pw_triton._weight_blocks(37, 40, 35, dtype)
    assert params["chunks"] == 2 and params["o_blocks"] == 3 and params["i_blocks"] == 3
    case = make_case((5, 37, 20), (40, 3, 17), (2, 1, 2), 5, 7, dtype=dtype)
    assert_matches_reference(case, *((1e-10, 1e-10) if dtype == torch.float64 else FP32_TOL))


def test_gpu_blocks_match_reference(gpu_blocks):
    # 65 x 65 = 4225 pixels: two weight-gradient chunks of 4096 at the GPU's sizes.
    params = pw_triton._weight_blocks(3, 2, 65 * 65, torch.float32)
    assert params["chunks"] == 2
    assert_matches_reference(make_case((3, 1), (2, 2), (1, 1), 65, 65), *FP32_TOL)


def test_float64_matches_reference():
    assert_matches_reference(make_case(*CASES[0].values[0], dtype=torch.float64), 1e-12, 1e-12)


def test_int32_offsets_and_direct_call():
    x, weight, bias, offsets, in_channels, out_channels = make_case((2, 3), (4, 1), (2, 1), 4, 5)
    case = (x, weight, bias, offsets.to(torch.int32), in_channels, out_channels)
    assert_matches_reference(case, *FP32_TOL, fn=grouped_pointwise_triton)


@pytest.mark.parametrize(
    ("batch", "k"),
    [pytest.param(1, 1, id="B1-k1"), *(pytest.param(2, k, id=f"B2-k{k}") for k in (1, 2, 3, 4))],
)
def test_rows_from_route(batch, k, make_routing):
    # Packed rows as a routing plan lays them out: each image on k of E = 4 experts.
    _, plan = make_routing(batch, 4, k, "some_empty" if k < 4 else "random", seed=k)
    counts = plan.counts.tolist()
    x, weight, bias, _, in_channels, out_channels = make_case((6, 3, 2, 5), (2, 5, 4, 3), counts, 3, 4)
    case = (x, weight, bias, plan.offsets.to(DEVICE), in_channels, out_channels)
    assert_matches_reference(case, *FP32_TOL)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param("channels_last", id="channels-last"),
        pytest.param("sliced", id="sliced"),
        pytest.param("weight_transposed", id="weight-transposed"),
    ],
)
def test_non_contiguous_input(layout):
    x, weight, bias, offsets, in_channels, out_channels = finite(make_case((2, 3), (4, 2), (1, 2), 5, 6))
    x_in, w_in = x, weight
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        x_in = wide[..., ::2]
    else:
        w_in = weight.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (x_in.is_contiguous() and w_in.is_contiguous())
    got = grouped_pointwise(x_in, w_in, bias, offsets, in_channels, out_channels, backend="triton")
    want = grouped_pointwise(x, weight, bias, offsets, in_channels, out_channels, backend="triton")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- buffers, determinism -----------------------------------------------------------------------


def _fwd_bwd(x, weight, bias, offsets, in_channels, out_channels):
    y = torch.ops.moce_triton.grouped_pointwise_fwd(x, weight, bias, offsets, in_channels, out_channels)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype).to(x.device)
    grads = torch.ops.moce_triton.grouped_pointwise_bwd(grad_y, x, weight, offsets, in_channels, out_channels)
    return (y, *grads)


@pytest.mark.parametrize(
    ("case", "blocks"),
    [
        pytest.param(((5, 37, 20), (40, 3, 17), (2, 0, 3), 5, 7), None, id="E3-empty1-5x7"),
        pytest.param(((2, 1), (3, 1), (1, 1), 1, 1), None, id="1x1"),
        pytest.param(((5, 37, 20), (40, 3, 17), (1, 1, 2), 5, 7), "small_blocks", id="small-blocks"),
    ],
)
def test_every_element_is_written(case, blocks, request):
    """With every torch.empty NaN-filled (outputs, partial sums, gradients), the results are the
    same bits as with the normal buffers: every element written, no partial sum read that was
    not written."""
    if blocks is not None:
        request.getfixturevalue(blocks)
    args = make_case(*case)
    want = _fwd_bwd(*args)
    request.getfixturevalue("nan_filled_empty")
    got = _fwd_bwd(*args)
    for name, a, b in zip(("y", "grad x", "grad w", "grad b"), got, want, strict=True):
        assert not bool(a.isnan().any()), f"{name}: an element was not written"
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16")])
def test_backward_is_deterministic(dtype, small_blocks):
    # Several rows, tiles and chunks: the reduction sums rows * chunks partial sums per expert.
    case = make_case((5, 37, 20), (40, 3, 17), (2, 1, 2), 5, 7, dtype=dtype)
    grad_out = torch.randn(5, 40, 5, 7, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    first = run(grouped_pointwise_triton, *case, grad_out)
    second = run(grouped_pointwise_triton, *case, grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_no_rows_gives_zero_param_grads():
    x, weight, bias, offsets, in_channels, out_channels = make_case((3, 4), (5, 2), (0, 0), 5, 6)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias)]
    out = grouped_pointwise_triton(*leaves, offsets, in_channels, out_channels)
    assert out.shape == (0, 5, 5, 6)
    grad_x, grad_w, grad_b = torch.autograd.grad(out.sum(), leaves)
    assert grad_x.shape == x.shape
    assert torch.equal(grad_w, torch.zeros_like(weight)) and torch.equal(grad_b, torch.zeros_like(bias))


# --- the ops: gradcheck, opcheck, torch.compile -------------------------------------------------


@pytest.mark.parametrize(
    ("case", "bias"),
    [
        pytest.param(((2, 3), (3, 1), (1, 1), 2, 3), True, id="bias"),
        pytest.param(((1, 2), (2, 2), (1, 1), 3, 2), False, id="no-bias"),
    ],
)
def test_gradcheck(case, bias):
    x, weight, b, offsets, in_channels, out_channels = make_case(*case, dtype=torch.float64, bias=bias)
    # Finite garbage: gradcheck perturbs every element, also the ones the op ignores.
    leaves = [x.nan_to_num(3.0), weight.nan_to_num(3.0)] + ([b.nan_to_num(3.0)] if bias else [])
    leaves = [t.requires_grad_(True) for t in leaves]

    def fn(*args):
        return grouped_pointwise_triton(
            args[0], args[1], args[2] if bias else None, offsets, in_channels, out_channels
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
    x, weight, b, offsets, in_channels, out_channels = finite(
        make_case((1, 2), (3, 1), (1, 1), 3, 4, dtype=dtype, bias=bias)
    )
    b = None if b is None else b.requires_grad_(requires_grad)
    args = (
        x.requires_grad_(requires_grad),
        weight.requires_grad_(requires_grad),
        b,
        offsets,
        in_channels,
        out_channels,
    )
    torch.library.opcheck(torch.ops.moce_triton.grouped_pointwise_fwd.default, args)
    grad_y = torch.randn(x.shape[0], weight.shape[1], *x.shape[2:]).to(dtype).to(DEVICE)
    bwd_args = (grad_y, x.detach(), weight.detach(), offsets, in_channels, out_channels)
    torch.library.opcheck(torch.ops.moce_triton.grouped_pointwise_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    x, weight, bias, offsets, in_channels, out_channels = finite(make_case((2, 3), (4, 1), (1, 1), 4, 5))
    leaves = [t.requires_grad_(True) for t in (x, weight, bias)]

    def fn(a, w, b):
        return grouped_pointwise_triton(a, w, b, offsets, in_channels, out_channels)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, want = compiled(*leaves), fn(*leaves)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_double_backward_raises():
    x, weight, bias, offsets, in_channels, out_channels = finite(
        make_case((2,), (3,), (1,), 3, 3, dtype=torch.float64)
    )
    x.requires_grad_(True)
    out = grouped_pointwise_triton(x, weight, bias, offsets, in_channels, out_channels)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    module = importlib.reload(pw_triton)  # would raise if the ops were defined twice
    case = make_case((2, 1), (3, 2), (1, 1), 3, 4)
    assert_matches_reference(case, *FP32_TOL, fn=module.grouped_pointwise_triton)


def test_module_exports_the_convention_name():
    assert _backend.implementation("grouped_pointwise", "triton").__name__ == "grouped_pointwise_triton"


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES[:2])
def test_gpu_moce_ir_s_expert_shapes(dtype, atol, rtol):
    # A MoCE-IR-S decoder level of width C = 96 at 64 x 64 (batch 8, k = 1): experts of ranks
    # 12, 24, 48, 96 (C / 8 .. C). Their input projections (C -> r), output projections
    # (r -> C) and kv projections (r -> 2r, with bias here) as one call each.
    counts, ranks = (3, 2, 2, 1), (12, 24, 48, 96)
    for in_channels, out_channels in (
        ((96,) * 4, ranks),
        (ranks, (96,) * 4),
        (ranks, [2 * r for r in ranks]),
    ):
        case = make_case(in_channels, out_channels, counts, 64, 64, dtype=dtype)
        assert_matches_reference(case, atol, rtol)


# --- ahead-of-time compile for sm_90 ------------------------------------------------------------

#: Compiles every kernel for sm_90 with the block sizes and warps the launchers pick on a GPU
#: (``_rows_blocks`` / ``_weight_blocks`` without the interpreter) and prints one JSON line per
#: kernel with its resource usage (``cuobjdump -res-usage``: registers, stack and local memory,
#: where spills go). Exits 3 without Triton's ahead-of-time API (the test skips).
AOT_BODY = """
    from moce_kernels.grouped_pointwise import triton as pw

    TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    ints = ("C_IN", "C_OUT", "P", "E")
    for label, dtype, c_in, c_out, transpose, offsets, gather in (
        ("rows-fwd-bf16-c96", torch.bfloat16, 96, 96, False, "*i64", False),
        ("rows-gradx-bf16-c96", torch.bfloat16, 96, 96, True, "*i32", False),
        ("rows-fwd-bf16-c12", torch.bfloat16, 96, 12, False, "*i64", False),
        ("rows-fwd-fp16-c96", torch.float16, 96, 96, False, "*i64", False),
        ("rows-fwd-fp32-c96", torch.float32, 96, 96, False, "*i64", False),
        ("rows-gradx-fp32-c96", torch.float32, 96, 96, True, "*i64", False),
        ("rows-fwd-fp64", torch.float64, 96, 96, False, "*i64", False),
        # dispatch_pointwise: the gather fused into the loads.
        ("rows-gather-bf16-c12", torch.bfloat16, 96, 12, False, "*i64", True),
        ("rows-gather-fp32-c96", torch.float32, 96, 96, False, "*i64", True),
    ):
        t = "*" + TL[dtype]
        b = pw._rows_blocks(c_in if transpose else c_out, c_out if transpose else c_in, 128 * 128, dtype)
        sig = dict(a_ptr=t, src_ptr="*i64", w_ptr=t, b_ptr=t, off_ptr=offsets, meta_ptr="*i32", y_ptr=t,
                   **dict.fromkeys(ints, "i32"), m_blocks="i32")
        consts = dict(TRANSPOSE=transpose, HAS_BIAS=not transpose, GATHER=gather, **pw._dot_flags(dtype),
                      BLOCK_E=4,
                      BLOCK_M=b["block_m"], BLOCK_K=b["block_k"], BLOCK_P=b["block_p"],
                      ACC=tl.float64 if dtype == torch.float64 else tl.float32)
        compile_(label, pw.grouped_pointwise_rows_kernel, sig, consts, pw._num_warps(dtype))
    for label, dtype, gather in (
        ("wgrad-bf16", torch.bfloat16, False),
        ("wgrad-fp32", torch.float32, False),
        ("wgrad-fp64", torch.float64, False),
        ("wgrad-gather-bf16", torch.bfloat16, True),
    ):
        t, acc = "*" + TL[dtype], "*fp64" if dtype == torch.float64 else "*fp32"
        b = pw._weight_blocks(96, 96, 128 * 128, dtype)
        sig = dict(x_ptr=t, src_ptr="*i64", gy_ptr=t, off_ptr="*i64", meta_ptr="*i32", part_w_ptr=acc,
                   part_b_ptr=acc, **dict.fromkeys(ints, "i32"), o_blocks="i32", i_blocks="i32", chunks="i32",
                   chunk_len="i32")
        consts = dict(GATHER=gather, **pw._dot_flags(dtype), BLOCK_E=4, BLOCK_O=b["block_o"],
                      BLOCK_I=b["block_i"],
                      BLOCK_P=b["block_p"], ACC=tl.float64 if dtype == torch.float64 else tl.float32)
        compile_(label, pw.grouped_pointwise_bwd_weight_kernel, sig, consts, pw._num_warps(dtype))
        sig = dict(part_w_ptr=acc, part_b_ptr=acc, off_ptr="*i32", meta_ptr="*i32", gw_ptr=t, gb_ptr=t,
                   C_IN="i32", C_OUT="i32", E="i32", o_blocks="i32", i_blocks="i32", chunks="i32")
        consts = dict(BLOCK_O=b["block_o"], BLOCK_I=b["block_i"], ACC=consts["ACC"])
        compile_(label.replace("wgrad", "reduce"), pw.grouped_pointwise_bwd_reduce_kernel, sig, consts,
                 pw._REDUCE_NUM_WARPS)
    """


def test_aot_compile_sm90():
    """Compile every kernel for sm_90 (Triton's own compiler and ptxas, no GPU needed): catches
    what the interpreter forgives (tl.dot shapes and dtypes, constexpr misuse, dtype mismatches in
    loops), and checks that none spills. Runs in a subprocess without TRITON_INTERPRET. Prints the
    registers per thread (``pytest -s``); ~15 s on 2 cores when Triton's cache is cold."""
    results = aot_resource_usage(AOT_BODY)
    assert len(results) == 17
    for r in results:
        print(r)
        # bf16 / fp16 products on the tensor cores; fp32 (IEEE), fp64 and the reduction on FMA.
        tensor_cores = ("bf16" in r["label"] or "fp16" in r["label"]) and "reduce" not in r["label"]
        assert (r["mma"] != "fma") == tensor_cores, r
        if "STACK" in r:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
