"""The experts' fused input and output GEMMs: ``dispatch_pointwise`` (dispatch fused into the
first 1x1 convolutions' loads) and ``pointwise_combine`` (residual, gates, the sum over k and the
write back to image order fused into the last one's store).

Each reference against an independent per-slot loop of ``F.conv2d`` over the plan's choices;
the Triton kernels (the interpreter here, the GPU when there is one) against the references,
forward and every gradient (x / h, weight, bias, residual, gates), over plans from ``route``
with empty experts, B = 1, B = 0, k = 1..E, odd planes, tiles forced small; NaN wherever an
expert must not look; NaN-filled buffers; determinism; float64 gradcheck; ``opcheck``;
torch.compile; bad arguments; an ahead-of-time compile of the new kernel for sm_90.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import _backend, dispatch_pointwise, pointwise_combine, route
from tests.ops._helpers import TRITON_DEVICE, aot_resource_usage

pw_triton = importlib.import_module("moce_kernels.grouped_pointwise.triton")
needs_triton = pytest.mark.skipif(not _backend.triton_usable()[0], reason="Triton cannot run here")
DEVICE = TRITON_DEVICE

# (in_channels, out_channels, B, k, pattern, H, W)
CASES = [
    pytest.param(((5, 9, 3), (6, 2, 7), 5, 2, "some_empty", 5, 7), id="E3-B5-k2-empty"),
    pytest.param(((4, 7, 3, 2), (6, 2, 5, 3), 4, 1, "random", 3, 4), id="E4-B4-k1"),
    pytest.param(((3, 6), (4, 4), 1, 1, "random", 1, 1), id="B1-1x1"),
    pytest.param(((2, 5, 3), (4, 1, 6), 3, 3, "random", 2, 3), id="k-equals-E"),
    pytest.param(((3, 4), (5, 2), 0, 1, "random", 3, 3), id="B0"),
]

# (dtype, atol, rtol): the kernels against the reference on the same values: float32 rounding of
# differently ordered sums, plus for bfloat16 a rounding of each row to bfloat16 that may land on
# the other side of a tie (eps 7.8e-3 on values O(1..5)).
DTYPES = [
    pytest.param(torch.float32, 2e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 3e-2, 1.6e-2, id="bf16"),
]


def _plan(batch, num_experts, k, pattern, seed=0):
    if batch == 0:
        return route(torch.zeros(0, num_experts), k)
    from tests.conftest import make_routing_impl  # noqa: PLC0415

    _, plan = make_routing_impl(batch, num_experts, k, pattern if k < num_experts else "random", seed=seed)
    return plan


def _to(plan, device):
    return type(plan)(*(t.to(device) for t in plan))


def make_case(in_channels, out_channels, batch, k, pattern, height, width, *, dtype=torch.float32, seed=0):
    """(plan, weight, bias) with NaN outside each expert's (out, in) block and past its bias."""
    g = torch.Generator().manual_seed(seed)
    num_experts, c_in, c_out = len(in_channels), max(in_channels), max(out_channels)
    weight = torch.full((num_experts, c_out, c_in), math.nan)
    bias = torch.full((num_experts, c_out), math.nan)
    for e, (i, o) in enumerate(zip(in_channels, out_channels, strict=True)):
        weight[e, :o, :i] = torch.randn(o, i, generator=g) / math.sqrt(i)
        bias[e, :o] = torch.randn(o, generator=g)
    plan = _to(_plan(batch, num_experts, k, pattern, seed), DEVICE)
    return plan, weight.to(dtype).to(DEVICE), bias.to(dtype).to(DEVICE), (height, width)


def _finite(t):
    return None if t is None else t.nan_to_num(0.0)


def _conv(x, weight, bias, e, c_in, c_out):
    """Expert e's 1x1 convolution of one [C, H, W] tensor, zero-padded to Cout_max."""
    w = weight[e, :c_out, :c_in].double()
    y = F.conv2d(x[None, :c_in].double(), w[:, :, None, None], bias[e, :c_out].double())[0]
    return F.pad(y, (0, 0, 0, 0, 0, weight.shape[1] - c_out))


# --- the references against per-slot loops ---------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_dispatch_pointwise_reference_is_the_per_slot_convolution(case):
    in_channels, out_channels, batch, k, *_ = case
    plan, weight, bias, (h, w) = make_case(*case)
    weight, bias = _finite(weight), _finite(bias)
    x = torch.randn(batch, max(in_channels), h, w, device=DEVICE)
    got = dispatch_pointwise(x, weight, bias, plan, in_channels, out_channels, backend="reference")
    assert got.shape == (batch * k, max(out_channels), h, w)
    for b in range(batch):
        for j in range(k):
            e = int(plan.experts[b, j])
            row = int(plan.inverse[b * k + j])
            want = _conv(x[b], weight, bias, e, in_channels[e], out_channels[e])
            torch.testing.assert_close(got[row].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("case", CASES)
def test_pointwise_combine_reference_is_the_gated_per_slot_sum(case, residual):
    in_channels, out_channels, batch, k, *_ = case
    plan, weight, bias, (h, w) = make_case(*case)
    weight, bias = _finite(weight), _finite(bias)
    rows = torch.randn(batch * k, max(in_channels), h, w, device=DEVICE)
    res = torch.randn(batch, max(out_channels), h, w, device=DEVICE) if residual else None
    got = pointwise_combine(rows, weight, bias, plan, in_channels, out_channels, res, backend="reference")
    assert got.shape == (batch, max(out_channels), h, w)
    for b in range(batch):
        want = torch.zeros(max(out_channels), h, w, dtype=torch.float64, device=DEVICE)
        for j in range(k):
            e = int(plan.experts[b, j])
            y = _conv(rows[int(plan.inverse[b * k + j])], weight, bias, e, in_channels[e], out_channels[e])
            want += float(plan.gates[b, j]) * (y + (res[b].double() if residual else 0))
        torch.testing.assert_close(got[b].double(), want, atol=1e-5, rtol=1e-5)


# --- Triton against the references ---------------------------------------------------------------


def _grads(out, leaves, seed=1):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype).to(DEVICE)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out)


def _dispatch_inputs(case, dtype, nan_garbage=True):
    in_channels, out_channels, batch, k, *_ = case
    plan, weight, bias, (h, w) = make_case(*case, dtype=dtype)
    x = (
        torch.randn(batch, max(in_channels), h, w, generator=torch.Generator().manual_seed(2))
        .to(dtype)
        .to(DEVICE)
    )
    if not nan_garbage:
        weight, bias = _finite(weight), _finite(bias)
    return plan, x, weight, bias, in_channels, out_channels


def _run_dispatch(backend, plan, x, weight, bias, in_channels, out_channels, acc=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    if acc is not None:  # the reference in float32 on the same values, NaN garbage zeroed
        leaves = [_finite(t.detach().to(acc)).requires_grad_(True) for t in leaves]
    out = dispatch_pointwise(*leaves, plan, in_channels, out_channels, backend=backend)
    return out, *_grads(out, leaves)


@needs_triton
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_dispatch_pointwise_triton_matches_reference(case, dtype, atol, rtol):
    inputs = _dispatch_inputs(case, dtype)
    got = _run_dispatch("triton", *inputs)
    want = _run_dispatch("reference", *inputs, acc=torch.float32)
    plan, x = inputs[0], inputs[1]
    terms = math.sqrt(max(1, x.shape[0] * plan.k * x.shape[2] * x.shape[3]))
    for name, a, b, scale in zip(
        ("y", "grad x", "grad w", "grad b"), got, want, (1, 1, terms, terms), strict=True
    ):
        assert a.dtype == dtype, name
        assert bool(a.isfinite().all()), f"{name}: a kernel read NaN garbage or skipped an element"
        torch.testing.assert_close(a.double(), b.double(), atol=atol * scale, rtol=rtol, msg=name)
    _assert_zero_outside_blocks(inputs, got[2], got[3])


def _assert_zero_outside_blocks(inputs, grad_w, grad_b):
    """Exact zeros outside each expert's (out, in) block, and everywhere for an expert no row chose."""
    plan, _, weight, _, in_channels, out_channels = inputs
    counts = plan.counts.tolist()
    for e, (i, o) in enumerate(zip(in_channels, out_channels, strict=True)):
        inside = torch.zeros(weight.shape[1:], dtype=torch.bool, device=weight.device)
        inside[:o, :i] = counts[e] > 0
        assert bool((grad_w[e][~inside] == 0).all()), f"expert {e}: grad w outside its block"
        assert bool((grad_b[e, o:] == 0).all()) and (counts[e] or bool((grad_b[e] == 0).all())), e


def _combine_inputs(case, dtype, residual_dtype, nan_garbage=True):
    in_channels, out_channels, batch, k, *_ = case
    plan, weight, bias, (h, w) = make_case(*case, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(batch * k, max(in_channels), h, w, generator=g)
    # NaN in each row's channels past its expert's input width: never read.
    experts_of_rows = plan.experts.flatten()[plan.sorted_slots.cpu()].tolist() if batch else []
    for n, e in enumerate(experts_of_rows):
        rows[n, in_channels[e] :] = math.nan if nan_garbage else 0.0
    residual = None
    if residual_dtype is not None:
        residual = torch.randn(batch, max(out_channels), h, w, generator=g).to(residual_dtype).to(DEVICE)
    gates = plan.gates.clone()
    if not nan_garbage:
        weight, bias = _finite(weight), _finite(bias)
    return plan, rows.to(dtype).to(DEVICE), weight, bias, in_channels, out_channels, residual, gates


def _run_combine(backend, plan, h, weight, bias, in_channels, out_channels, residual, gates, acc=None):
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(True)
        for t in (h, weight, bias, residual, gates)
    ]
    if acc is not None:
        leaves = [None if t is None else _finite(t.detach().to(acc)).requires_grad_(True) for t in leaves]
    h, weight, bias, residual, gates = leaves
    out = pointwise_combine(
        h, weight, bias, plan, in_channels, out_channels, residual, gates, backend=backend
    )
    return out, *_grads(out, leaves)


@needs_triton
@pytest.mark.parametrize(
    "residual_dtype", ["same", torch.float32, None], ids=["residual", "fp32-residual", "none"]
)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_pointwise_combine_triton_matches_reference(case, dtype, atol, rtol, residual_dtype):
    residual_dtype = dtype if residual_dtype == "same" else residual_dtype
    inputs = _combine_inputs(case, dtype, residual_dtype)
    got = _run_combine("triton", *inputs)
    want = _run_combine("reference", *inputs, acc=torch.float32)
    plan, h = inputs[0], inputs[1]
    out_dtype = dtype if residual_dtype is None else torch.promote_types(dtype, residual_dtype)
    assert got[0].dtype == out_dtype and got[0].shape == (plan.batch_size, inputs[2].shape[1], *h.shape[2:])
    names = (
        ["out", "grad h", "grad w", "grad b"] + (["grad residual"] if residual_dtype else []) + ["grad gates"]
    )
    terms = math.sqrt(max(1, h.shape[0] * h.shape[2] * h.shape[3]))
    features = math.sqrt(max(1, inputs[2].shape[1] * h.shape[2] * h.shape[3]))
    scales = {"grad w": terms, "grad b": terms, "grad gates": features}
    for name, a, b in zip(names, got, want, strict=True):
        assert bool(a.isfinite().all()), f"{name}: a kernel read NaN garbage or skipped an element"
        torch.testing.assert_close(
            a.double(), b.double(), atol=atol * scales.get(name, 1), rtol=rtol, msg=name
        )
    _assert_zero_outside_blocks(inputs[:6], got[2], got[3])


@needs_triton
@pytest.mark.parametrize("case", CASES[:2])
def test_small_tiles_match_reference(case, monkeypatch):
    # 16-wide tiles and 16-pixel chunks: several channel tiles, input-channel steps and pixel tiles.
    monkeypatch.setattr(pw_triton, "_limits", lambda dtype: (16, 16, 16, 16, 16))
    monkeypatch.setattr(pw_triton, "_CHUNK_PIXELS", 16)
    wide = ((5, 37, 20), (40, 3, 17), *case[2:])
    got = _run_dispatch("triton", *_dispatch_inputs(wide, torch.float32))
    want = _run_dispatch("reference", *_dispatch_inputs(wide, torch.float32), acc=torch.float32)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    got = _run_combine("triton", *_combine_inputs(wide, torch.float32, torch.float32))
    want = _run_combine("reference", *_combine_inputs(wide, torch.float32, torch.float32), acc=torch.float32)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-4, rtol=1e-5)


@needs_triton
def test_float32_gpu_tiles_match_reference(monkeypatch):
    # On a GPU pointwise_combine caps float32's pixel tile (registers): the same tile here.
    pc_triton = importlib.import_module("moce_kernels.pointwise_combine.triton")
    monkeypatch.setattr(pc_triton._triton_common, "interpreted", lambda: False)
    assert pc_triton._blocks(7, 9, 9 * 9, torch.float32)["p_blocks"] == 2
    case = ((5, 9, 3), (6, 2, 7), 3, 2, "random", 9, 9)
    got = _run_combine("triton", *_combine_inputs(case, torch.float32, torch.float32))
    want = _run_combine("reference", *_combine_inputs(case, torch.float32, torch.float32), acc=torch.float32)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@needs_triton
def test_every_element_is_written_and_runs_repeat_bit_for_bit(nan_filled_empty):
    case = CASES[0].values[0]
    for fn, inputs in (
        (_run_dispatch, _dispatch_inputs(case, torch.bfloat16)),
        (_run_combine, _combine_inputs(case, torch.bfloat16, torch.float32)),
    ):
        first, second = fn("triton", *inputs), fn("triton", *inputs)
        for a, b in zip(first, second, strict=True):
            assert not bool(a.isnan().any()), "an element was not written"
            assert torch.equal(a, b)


@needs_triton
def test_gradcheck_float64():
    case = CASES[0].values[0]
    plan, x, weight, bias, in_channels, out_channels = _dispatch_inputs(
        case, torch.float64, nan_garbage=False
    )
    leaves = [t.requires_grad_(True) for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda *a: dispatch_pointwise(*a, plan, in_channels, out_channels, backend="triton"),
        leaves,
        fast_mode=True,
    )
    plan, h, weight, bias, in_channels, out_channels, residual, gates = _combine_inputs(
        case, torch.float64, torch.float64, nan_garbage=False
    )
    leaves = [t.requires_grad_(True) for t in (h, weight, bias, residual, gates.double())]

    def fn(h, w, b, r, g):
        return pointwise_combine(h, w, b, plan, in_channels, out_channels, r, g, backend="triton")

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@needs_triton
def test_opcheck():
    case = CASES[0].values[0]
    plan, x, weight, bias, in_channels, out_channels = _dispatch_inputs(
        case, torch.float32, nan_garbage=False
    )
    args = (x.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True), plan.offsets,
            plan.sorted_images, plan.inverse, in_channels, out_channels)  # fmt: skip
    torch.library.opcheck(torch.ops.moce_triton.dispatch_pointwise_fwd.default, args)
    plan, h, weight, bias, in_channels, out_channels, residual, gates = _combine_inputs(
        case, torch.float32, torch.float32, nan_garbage=False
    )
    leaves = [t.requires_grad_(True) for t in (h, weight, bias, residual, gates)]
    args = (*leaves, plan.offsets, plan.inverse, plan.sorted_slots, in_channels, out_channels)
    torch.library.opcheck(torch.ops.moce_triton.pointwise_combine_fwd.default, args)


@needs_triton
def test_torch_compile_fullgraph():
    # The two ops back to back, as the sync-free expert path uses them.
    case = CASES[0].values[0]
    plan, _, weight, bias, in_channels, out_channels, residual, gates = _combine_inputs(
        case, torch.float32, torch.float32, nan_garbage=False
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(plan.batch_size, max(in_channels), *residual.shape[2:], generator=g).to(DEVICE)
    w_in = torch.randn(weight.shape[0], max(in_channels), max(in_channels), generator=g).to(DEVICE)
    args = [t.requires_grad_(True) for t in (x, w_in, weight, bias, residual, gates)]

    def model(x, w_in, w, b, r, gates):
        rows = dispatch_pointwise(x, w_in, None, plan, in_channels, in_channels, backend="triton")
        return pointwise_combine(rows, w, b, plan, in_channels, out_channels, r, gates, backend="triton")

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, want = compiled(*args), model(*args)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), args)
    want_grads = torch.autograd.grad(want.square().sum(), args)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_triton
def test_modules_export_the_convention_names():
    for op in ("dispatch_pointwise", "pointwise_combine"):
        assert _backend.implementation(op, "triton").__name__ == f"{op}_triton"


# --- bad arguments -----------------------------------------------------------------------------

_PLAN = route(torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), 1)  # B = 3, E = 2, k = 1
_W = torch.randn(2, 5, 4)
_X = torch.randn(3, 4, 2, 2)


def _bad_plan(**fields):
    return _PLAN._replace(**fields)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(lambda: dispatch_pointwise(_X[:2], _W, None, _PLAN, [4, 4], [5, 5]), ValueError,
                     "x must have batch size 3", id="dispatch-batch"),
        pytest.param(lambda: dispatch_pointwise(_X, _W[:1], None, _PLAN, [4], [5]), ValueError,
                     "weight must hold E = 2", id="dispatch-experts"),
        pytest.param(lambda: dispatch_pointwise(_X, _W, None, "plan", [4, 4], [5, 5]), TypeError,
                     "plan must be a RoutingPlan", id="dispatch-not-a-plan"),
        pytest.param(lambda: dispatch_pointwise(_X, _W.double(), None, _PLAN, [4, 4], [5, 5]), TypeError,
                     "weight", id="dispatch-weight-dtype"),
        pytest.param(lambda: dispatch_pointwise(_X, _W, None, _PLAN, [4, 5], [5, 5]), ValueError,
                     r"in_channels\[1\] must be in 1..4", id="dispatch-width"),
        pytest.param(lambda: dispatch_pointwise(_X, _W, None, _bad_plan(sorted_images=torch.tensor([0, 1, 3])),  # noqa: E501
                                                [4, 4], [5, 5]), ValueError,
                     r"plan.sorted_images\[2\] = 3 is out of range", id="dispatch-corrupt-plan"),
        pytest.param(lambda: dispatch_pointwise(_X, _W, None, _bad_plan(offsets=torch.tensor([0, 2, 2])),
                                                [4, 4], [5, 5]), ValueError,
                     "offsets must rise from 0 to N = 3", id="dispatch-offsets"),
        pytest.param(lambda: pointwise_combine(_X[:2], _W, None, _PLAN, [4, 4], [5, 5]), ValueError,
                     "h must have B \\* k = 3 rows", id="combine-rows"),
        pytest.param(lambda: pointwise_combine(_X, _W, None, _PLAN, [4, 4], [5, 5], torch.randn(3, 4, 2, 2)),
                     ValueError, "residual", id="combine-residual-shape"),
        pytest.param(lambda: pointwise_combine(_X, _W, None, _PLAN, [4, 4], [5, 5], None, torch.ones(3, 2)),
                     ValueError, "gates", id="combine-gates-shape"),
        pytest.param(lambda: pointwise_combine(_X, _W, None, _PLAN, [4, 4], [5, 5],
                                               torch.zeros(3, 5, 2, 2, dtype=torch.int64)),
                     TypeError, "residual", id="combine-residual-dtype"),
        pytest.param(lambda: pointwise_combine(_X, _W, None, _bad_plan(inverse=torch.tensor([0, 1, -1])),
                                               [4, 4], [5, 5]), ValueError,
                     r"plan.inverse\[2\] = -1 is out of range", id="combine-corrupt-plan"),
        pytest.param(lambda: pointwise_combine(_X, _W, None, _PLAN, [4, 4], [5, 5], backend="gpu"),
                     ValueError,
                     "backend must be one of", id="combine-backend"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- ahead-of-time compile for sm_90 -----------------------------------------------------------

AOT_BODY = """
    from moce_kernels.grouped_pointwise import triton as pw
    from moce_kernels.pointwise_combine import triton as pc

    TL = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    for label, dtype, residual, c_in, c_out in (
        ("combine-bf16-r12-c96", torch.bfloat16, "*fp32", 96, 96),
        ("combine-bf16-c96-no-residual", torch.bfloat16, None, 96, 96),
        ("combine-fp32-c96", torch.float32, "*fp32", 96, 96),
        ("combine-fp64", torch.float64, "*fp64", 96, 96),
    ):
        t = "*" + TL[dtype]
        b = pc._blocks(c_out, c_in, 128 * 128, dtype)
        sig = dict(h_ptr=t, w_ptr=t, b_ptr=t, off_ptr="*i64", meta_ptr="*i32", inv_ptr="*i64",
                   gates_ptr="*fp32", res_ptr=residual or t, out_ptr=residual or t,
                   C_IN="i32", C_OUT="i32", P="i32", E="i32", K="i32", m_blocks="i32")
        consts = dict(HAS_BIAS=True, HAS_RESIDUAL=residual is not None, **pw._dot_flags(dtype), BLOCK_E=4,
                      BLOCK_J=2, BLOCK_M=b["block_m"], BLOCK_K=b["block_k"], BLOCK_P=b["block_p"],
                      ACC=tl.float64 if dtype == torch.float64 else tl.float32)
        compile_(label, pc.pointwise_combine_kernel, sig, consts, pw._num_warps(dtype))
    """


def test_aot_compile_sm90():
    """The fused combine kernel compiles for sm_90 (Triton's compiler and ptxas, no GPU): bf16
    products on the tensor cores, and no spills. The gather variants of the row kernels are
    compiled by tests/ops/test_grouped_pointwise_triton.py."""
    results = aot_resource_usage(AOT_BODY)
    assert len(results) == 4
    for r in results:
        print(r)
        assert (r["mma"] != "fma") == ("bf16" in r["label"]), r
        if "STACK" in r:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
