"""combine on the Triton kernels (moce_kernels/combine/triton.py) against combine_reference.

Forward and the gradients of y and the gates, every routing pattern and (E, k), gates from the
plan (with autograd history back to the router's logits), mixed dtypes, layouts, several feature
chunks (the deterministic two-stage gate reduction), corrupted plans, NaN-prefilled buffers,
determinism, gradcheck, opcheck, torch.compile and an ahead-of-time sm_90 compile. Without a GPU
the kernels run through the Triton interpreter on the CPU (tests/conftest.py); with one, on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from moce_kernels import _backend, combine, route
from moce_kernels.combine.reference import combine_reference
from tests.ops._helpers import (
    EK_CASES,
    PATTERNS,
    assert_all_written,
    assert_compiled_for_sm90,
    plan_on_device,
    prefilled_buffers,
    skip_unless_triton_usable,
    sm90_labels,
)
from tests.ops._helpers import TRITON_DEVICE as DEVICE

skip_unless_triton_usable()

from moce_kernels.combine import triton as combine_triton_module  # noqa: E402  (needs triton)
from moce_kernels.combine.triton import combine_triton  # noqa: E402

#: (y dtype, gates dtype, atol, rtol). Both sides accumulate in float32 (float64) and round
#: once to the output dtype; the summation order over k may differ (one ulp of bf16 / fp16).
DTYPES = [
    pytest.param(torch.float32, torch.float32, 1e-5, 1.3e-6, id="fp32"),
    pytest.param(torch.float64, torch.float64, 1e-12, 1e-12, id="fp64"),
    pytest.param(torch.bfloat16, torch.bfloat16, 2e-2, 1.6e-2, id="bf16"),
    pytest.param(torch.float16, torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, 2e-2, 1.6e-2, id="bf16-gates-fp32"),
    pytest.param(torch.float32, torch.float64, 1e-5, 1.3e-6, id="fp32-gates-fp64"),
]


def check_against_reference(y, gates, plan, *, atol=1e-5, rtol=1.3e-6, need=("y", "gates")):
    """Output and the requested gradients of combine_triton against combine_reference.

    ``gates=None`` uses plan.gates (no gate gradient then). The gate gradient sums over all the
    features of a row: its tolerance grows with their square root.
    """
    y_op = y.detach().clone().requires_grad_("y" in need)
    y_ref = y.detach().clone().requires_grad_("y" in need)
    g_op = g_ref = None
    if gates is not None:
        g_op = gates.detach().clone().requires_grad_("gates" in need)
        g_ref = gates.detach().clone().requires_grad_("gates" in need)
    out = combine_triton(y_op, plan, g_op)
    want = combine_reference(y_ref, plan, g_ref)
    assert out.dtype == y.dtype and out.shape == want.shape
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)

    leaves = [t for t in (y_op, g_op) if t is not None and t.requires_grad]
    ref_leaves = [t for t in (y_ref, g_ref) if t is not None and t.requires_grad]
    if not leaves:
        return out
    grad_out = torch.randn(out.shape, device=y.device).to(y.dtype)
    got = torch.autograd.grad(out, leaves, grad_out)
    ref = torch.autograd.grad(want, ref_leaves, grad_out)
    features = math.prod(y.shape[1:])
    for leaf, g, r in zip(leaves, got, ref, strict=True):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        scale = math.sqrt(max(1, features)) if leaf is g_op else 1.0
        torch.testing.assert_close(g, r, atol=atol * scale, rtol=rtol)
    return out


def random_gates(batch, k, dtype=torch.float32):
    return torch.rand(batch, k).to(dtype).to(DEVICE)


# --- against the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("num_experts", "k"), EK_CASES)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(5, id="B5")])
def test_matches_reference(make_routing, pattern, num_experts, k, batch):
    _, plan = make_routing(batch, num_experts, k, pattern, seed=batch * 100 + num_experts * 10 + k)
    # 3 x 13 x 21 = 819 features: not a multiple of the block size.
    y = torch.randn(batch * k, 3, 13, 21, device=DEVICE)
    check_against_reference(y, random_gates(batch, k), plan_on_device(plan))


def test_public_function_backend_triton(make_routing):
    _, plan = make_routing(4, 5, 2, "some_empty", seed=2)
    plan = plan_on_device(plan)
    y, gates = torch.randn(8, 2, 3, 5, device=DEVICE), random_gates(4, 2)
    torch.testing.assert_close(
        combine(y, plan, gates, backend="triton"), combine_reference(y, plan, gates), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 1, id="E4-k1"), pytest.param(5, 3, id="E5-k3")]
)
def test_plan_gates_by_default(make_routing, num_experts, k):
    _, plan = make_routing(4, num_experts, k, "random", seed=11)
    check_against_reference(torch.randn(4 * k, 2, 5, 3, device=DEVICE), None, plan_on_device(plan))


def test_gradient_reaches_the_router_logits(make_routing):
    # The model's path: route -> combine(y, plan) with the plan's gates, all on Triton.
    logits, _ = make_routing(5, 4, 2, "random", seed=4)
    logits = logits.to(DEVICE)
    y = torch.randn(10, 3, 4, 4, device=DEVICE)
    grad_out = torch.randn(5, 3, 4, 4, device=DEVICE)
    leaves = [logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)]
    plan = route(leaves[0], 2, backend="triton")
    (got,) = torch.autograd.grad(combine(y, plan, backend="triton"), leaves[0], grad_out)
    (want,) = torch.autograd.grad(
        combine_reference(y, route(leaves[1], 2, backend="reference")), leaves[1], grad_out
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "need", [pytest.param(("y",), id="y-only"), pytest.param(("gates",), id="gates-only")]
)
def test_one_gradient_at_a_time(make_routing, need):
    _, plan = make_routing(4, 5, 3, "random", seed=3)
    check_against_reference(
        torch.randn(12, 2, 9, device=DEVICE), random_gates(4, 3), plan_on_device(plan), need=need
    )


def test_all_images_on_one_expert(make_routing):
    _, plan = make_routing(6, 4, 1, "one_expert")
    y, gates = torch.randn(6, 2, 3, 3, device=DEVICE), random_gates(6, 1)
    out = check_against_reference(y, gates, plan_on_device(plan))
    torch.testing.assert_close(out, y * gates.view(6, 1, 1, 1))


def test_empty_batch():
    plan = plan_on_device(route(torch.randn(0, 4), 2))
    y = torch.randn(0, 3, 4, device=DEVICE, requires_grad=True)
    gates = torch.rand(0, 2, device=DEVICE, requires_grad=True)
    out = combine_triton(y, plan, gates)
    assert out.shape == (0, 3, 4)
    grad_y, grad_gates = torch.autograd.grad(out.sum(), (y, gates))
    assert grad_y.shape == (0, 3, 4) and grad_gates.shape == (0, 2)


@pytest.mark.parametrize(("y_dtype", "gates_dtype", "atol", "rtol"), DTYPES)
def test_dtypes(make_routing, y_dtype, gates_dtype, atol, rtol):
    _, plan = make_routing(4, 5, 3, "random", seed=7)
    y = torch.randn(12, 6, 7, 3).to(y_dtype).to(DEVICE)
    check_against_reference(y, random_gates(4, 3, gates_dtype), plan_on_device(plan), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "feature_shape",
    [pytest.param((), id="1d"), pytest.param((7,), id="2d"), pytest.param((2, 1, 1), id="4d-1x1")],
)
def test_any_rank(make_routing, feature_shape):
    _, plan = make_routing(3, 4, 2, "some_empty", seed=1)
    check_against_reference(
        torch.randn(6, *feature_shape, device=DEVICE), random_gates(3, 2), plan_on_device(plan)
    )


def test_zero_features(make_routing):
    _, plan = make_routing(3, 4, 2, "random", seed=1)
    out = check_against_reference(
        torch.randn(6, 0, 4, device=DEVICE), random_gates(3, 2), plan_on_device(plan)
    )
    assert out.shape == (3, 0, 4)


def test_channels_last_kept(make_routing):
    _, plan = make_routing(3, 4, 2, "random", seed=3)
    y = torch.randn(6, 5, 4, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    out = check_against_reference(y, random_gates(3, 2), plan_on_device(plan))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_strided_inputs(make_routing):
    _, plan = make_routing(3, 4, 2, "random", seed=4)
    y = torch.randn(6, 4, 10, device=DEVICE)[..., ::2]
    gates = torch.rand(2, 3, device=DEVICE).t()  # [3, 2], not contiguous
    check_against_reference(y, gates, plan_on_device(plan))


@pytest.mark.parametrize(
    "features", [pytest.param((5, 7, 3), id="105-7chunks"), pytest.param((23, 47), id="1081-68chunks")]
)
def test_several_feature_chunks(make_routing, monkeypatch, features):
    # Blocks of 16 features: a row spans several programs, and with 68 chunks the gate reduction
    # loops over more than one BLOCK_C (64) of partial sums.
    monkeypatch.setattr(combine_triton_module, "row_block", lambda n: (16, 1))
    _, plan = make_routing(3, 4, 2, "random", seed=5)
    check_against_reference(
        torch.randn(6, *features, device=DEVICE), random_gates(3, 2), plan_on_device(plan)
    )


# --- robustness -----------------------------------------------------------------------------------


def test_buffers_fully_written(make_routing, monkeypatch):
    monkeypatch.setattr(combine_triton_module, "row_block", lambda n: (256, 4))  # 4 chunks per row
    _, plan = make_routing(5, 4, 3, "some_empty", seed=6)
    plan = plan_on_device(plan)
    y = torch.randn(15, 3, 13, 21, device=DEVICE, requires_grad=True)
    gates = random_gates(5, 3).requires_grad_(True)
    with prefilled_buffers(monkeypatch):
        out = combine_triton(y, plan, gates)
        grad_y, grad_gates = torch.autograd.grad(out, (y, gates), torch.randn(out.shape, device=DEVICE))
    for name, t in (("output", out), ("grad y", grad_y), ("grad gates", grad_gates)):
        assert_all_written(t, name)
    torch.testing.assert_close(out, combine_reference(y, plan, gates), atol=1e-5, rtol=1.3e-6)


def test_corrupted_plan_is_never_dereferenced_out_of_bounds(make_routing):
    # Out-of-range indices: no illegal access; what depends on them is NaN, the rest is right.
    _, plan = make_routing(3, 4, 2, "random", seed=9)
    plan = plan_on_device(plan)
    bad_inverse = plan.inverse.clone()
    bad_inverse[2] = 1 << 40  # slot 2 = image 1, choice 0
    bad_slots = plan.sorted_slots.clone()
    bad_slots[0] = -3
    bad = plan._replace(inverse=bad_inverse, sorted_slots=bad_slots)
    y = torch.randn(6, 2, 5, device=DEVICE, requires_grad=True)
    gates = random_gates(3, 2).requires_grad_(True)
    out = combine_triton(y, bad, gates)
    want = combine_reference(y, plan, gates)
    assert bool(out[1].isnan().all())
    torch.testing.assert_close(out[[0, 2]], want[[0, 2]])
    grad_y, grad_gates = torch.autograd.grad(out, (y, gates), torch.ones_like(out))
    assert bool(grad_y[0].isnan().all()) and not bool(grad_y[1:].isnan().any())
    assert bool(grad_gates[1, 0].isnan())


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        pytest.param("inverse", torch.zeros(5, dtype=torch.int64), ValueError, id="short-inverse"),
        pytest.param("sorted_slots", torch.zeros(7, dtype=torch.int64), ValueError, id="long-sorted_slots"),
        pytest.param("inverse", torch.zeros(6), TypeError, id="float-inverse"),
    ],
)
def test_malformed_plan_raises(make_routing, field, value, error):
    _, plan = make_routing(3, 4, 2, "random", seed=10)
    bad = plan_on_device(plan)._replace(**{field: value.to(DEVICE)})
    with pytest.raises(error, match=f"plan.{field}"):
        combine_triton(torch.randn(6, 2, device=DEVICE), bad)


def test_backward_is_deterministic(make_routing, monkeypatch):
    monkeypatch.setattr(combine_triton_module, "row_block", lambda n: (64, 2))  # several partials
    _, plan = make_routing(6, 5, 3, "random", seed=11)
    plan = plan_on_device(plan)
    y = torch.randn(18, 3, 9, 11, device=DEVICE, requires_grad=True)
    gates = random_gates(6, 3).requires_grad_(True)
    out = combine_triton(y, plan, gates)
    grad_out = torch.randn(out.shape, device=DEVICE)
    first = torch.autograd.grad(out, (y, gates), grad_out, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, (y, gates), grad_out, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert torch.equal(combine_triton(y, plan, gates), out)


def test_gradcheck(make_routing):
    _, plan = make_routing(3, 4, 2, "some_empty", seed=12)
    plan = plan_on_device(plan)
    y = torch.randn(6, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    gates = torch.rand(3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, g: combine_triton(a, plan, g), (y, gates))


def test_double_backward_raises(make_routing):
    _, plan = make_routing(3, 4, 2, "random", seed=13)
    y = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    out = combine_triton(y, plan_on_device(plan), random_gates(3, 2))
    (grad,) = torch.autograd.grad(out, y, torch.ones_like(out).requires_grad_(True), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# --- torch.library ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y_dtype", "gates_dtype"),
    [
        pytest.param(torch.float32, torch.float32, id="fp32"),
        pytest.param(torch.bfloat16, torch.float32, id="bf16-gates-fp32"),
    ],
)
def test_opcheck(make_routing, y_dtype, gates_dtype):
    _, plan = make_routing(4, 5, 2, "random", seed=14)
    plan = plan_on_device(plan)
    y = torch.randn(8, 12, device=DEVICE).to(y_dtype).requires_grad_(True)
    gates = random_gates(4, 2, gates_dtype).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.moce_triton.combine_fwd.default, (y, gates, plan.inverse, plan.sorted_slots)
    )
    grad_out = torch.randn(4, 12, device=DEVICE).to(y_dtype)
    for need_y, need_gates in ((True, True), (True, False), (False, True)):
        args = (grad_out, y.detach(), gates.detach(), plan.inverse, plan.sorted_slots, need_y, need_gates)
        torch.library.opcheck(torch.ops.moce_triton.combine_bwd.default, args)


def test_torch_compile(make_routing):
    _, plan = make_routing(4, 5, 2, "random", seed=15)
    plan = plan_on_device(plan)
    y = torch.randn(8, 3, 5, 2, device=DEVICE, requires_grad=True)
    gates = random_gates(4, 2).requires_grad_(True)
    weights = torch.randn(4, 3, 5, 2, device=DEVICE)

    def step(a, g):
        return (combine_triton(a, plan, g) * weights).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(y, gates), (y, gates))
    want = torch.autograd.grad(step(y, gates), (y, gates))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- ahead-of-time compile for the GPU ---------------------------------------------------------

_MOD = "moce_kernels.combine.triton"
_FWD_SIG = {
    "y_ptr": "*fp32",
    "gates_ptr": "*fp32",
    "inverse_ptr": "*i64",
    "out_ptr": "*fp32",
    "S": "i32",
    "F": "i32",
    "K": "i32",
    "NUM_CHUNKS": "i32",
    "ACC": "constexpr",
    "BLOCK_F": "constexpr",
}
_BWD_SIG = {
    "grad_out_ptr": "*fp32",
    "y_ptr": "*fp32",
    "gates_ptr": "*fp32",
    "sorted_slots_ptr": "*i64",
    "grad_y_ptr": "*fp32",
    "partials_ptr": "*fp32",
    "S": "i32",
    "F": "i32",
    "K": "i32",
    "NUM_CHUNKS": "i32",
    **dict.fromkeys(("ACC", "NEED_Y", "NEED_GATES", "BLOCK_F"), "constexpr"),
}
_GATES_SIG = {
    "partials_ptr": "*fp32",
    "inverse_ptr": "*i64",
    "grad_gates_ptr": "*fp32",
    "S": "i32",
    "NUM_CHUNKS": "i32",
    **dict.fromkeys(("ACC", "BLOCK_S", "BLOCK_C"), "constexpr"),
}
_BF16 = {"y_ptr": "*bf16", "out_ptr": "*bf16", "grad_out_ptr": "*bf16", "grad_y_ptr": "*bf16"}
_FP64 = {k: "*fp64" for k in ("y_ptr", "gates_ptr", "out_ptr", "grad_out_ptr", "grad_y_ptr", "partials_ptr")}


def _only(sig: dict, overrides: dict) -> dict:
    return {**sig, **{k: v for k, v in overrides.items() if k in sig}}


AOT_SPECS = [
    ("fwd-fp32", _MOD, "combine_fwd_kernel", _FWD_SIG, dict(ACC="tl.float32", BLOCK_F=4096)),
    ("fwd-bf16", _MOD, "combine_fwd_kernel", _only(_FWD_SIG, _BF16), dict(ACC="tl.float32", BLOCK_F=1024)),
    (
        "bwd-fp32-both",
        _MOD,
        "combine_bwd_kernel",
        _BWD_SIG,
        dict(ACC="tl.float32", NEED_Y=True, NEED_GATES=True, BLOCK_F=4096),
    ),
    (
        "bwd-bf16-gates-fp16-y-only",
        _MOD,
        "combine_bwd_kernel",
        {**_only(_BWD_SIG, _BF16), "gates_ptr": "*fp16"},
        dict(ACC="tl.float32", NEED_Y=True, NEED_GATES=False, BLOCK_F=1024),
    ),
    (
        "bwd-fp64-gates-only",
        _MOD,
        "combine_bwd_kernel",
        _only(_BWD_SIG, _FP64),
        dict(ACC="tl.float64", NEED_Y=False, NEED_GATES=True, BLOCK_F=512),
    ),
    (
        "gates-fp32",
        _MOD,
        "combine_gates_bwd_kernel",
        _GATES_SIG,
        dict(ACC="tl.float32", BLOCK_S=64, BLOCK_C=64),
    ),
    (
        "gates-fp64",
        _MOD,
        "combine_gates_bwd_kernel",
        {**_GATES_SIG, "partials_ptr": "*fp64", "grad_gates_ptr": "*fp64"},
        dict(ACC="tl.float64", BLOCK_S=64, BLOCK_C=16),
    ),
]


@pytest.mark.parametrize("label", sm90_labels(AOT_SPECS))
def test_kernels_compile_for_sm90(sm90_results, label):
    assert_compiled_for_sm90(sm90_results[label])


def test_module_exports_the_convention_name():
    assert _backend.implementation("combine", "triton") is combine_triton_module.combine_triton
