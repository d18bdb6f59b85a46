"""route on the Triton kernels (moce_kernels/route/triton.py) against route_reference.

Every field of the plan, the gradients of gates / probs / noisy_logits w.r.t. logits and noise,
gradcheck, the tie and NaN rules, determinism, NaN/sentinel-prefilled buffers, opcheck,
torch.compile and an ahead-of-time sm_90 compile of each kernel. Without a GPU the kernels run
on the CPU through the Triton interpreter (tests/conftest.py); with one, on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from moce_kernels import _backend, route
from moce_kernels.route.reference import RoutingPlan, route_reference
from tests.ops._helpers import (
    EK_CASES,
    PATTERNS,
    assert_all_written,
    assert_compiled_for_sm90,
    prefilled_buffers,
    skip_unless_triton_usable,
    sm90_labels,
)
from tests.ops._helpers import TRITON_DEVICE as DEVICE

skip_unless_triton_usable()

from moce_kernels.route import triton as route_triton_module  # noqa: E402  (needs triton)
from moce_kernels.route.triton import MAX_BATCH, MAX_EXPERTS, route_triton  # noqa: E402

INT_FIELDS = ("experts", "counts", "offsets", "sorted_slots", "sorted_images", "inverse")
FLOAT_FIELDS = ("gates", "probs", "noisy_logits")
#: Gates/probs are float32 softmaxes of O(1) logits; the kernel's exp may differ by an ulp.
F32_TOL = dict(atol=1e-6, rtol=1e-5)


# --- local helpers ----------------------------------------------------------------------------


def assert_plans_equal(plan: RoutingPlan, ref: RoutingPlan) -> None:
    """Index fields bit-equal, float fields within float32 rounding, dtypes and shapes equal."""
    for name in INT_FIELDS:
        got, want = getattr(plan, name), getattr(ref, name)
        assert got.dtype == torch.int64, name
        assert torch.equal(got, want), f"{name}: {got.tolist()} != {want.tolist()}"
    for name in FLOAT_FIELDS:
        got, want = getattr(plan, name), getattr(ref, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want.detach(), **F32_TOL, msg=name)


def check_plan_is_consistent(plan: RoutingPlan) -> None:
    """The plan is a valid permutation whatever the values (used where no reference applies)."""
    batch, k = plan.experts.shape
    experts = plan.experts.cpu()
    assert bool(((experts >= 0) & (experts < plan.num_experts)).all())
    for row in experts.tolist():
        assert len(set(row)) == k, "an image picked the same expert twice"
    slots = batch * k
    assert sorted(plan.sorted_slots.tolist()) == list(range(slots))
    assert plan.inverse[plan.sorted_slots].tolist() == list(range(slots))
    assert plan.offsets[-1].item() == slots


def make_logits(batch, num_experts, k, pattern, seed, make_routing):
    logits, _ = make_routing(batch, num_experts, k, pattern, seed=seed)
    return logits.to(DEVICE)


# --- forward: every field against the reference ---------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("num_experts", "k"), EK_CASES)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(7, id="B7")])
def test_plan_matches_reference(make_routing, pattern, num_experts, k, batch):
    logits = make_logits(batch, num_experts, k, pattern, batch * 100 + num_experts * 10 + k, make_routing)
    plan = route_triton(logits, k)
    assert_plans_equal(plan, route_reference(logits, k))
    assert (plan.batch_size, plan.num_experts, plan.k) == (batch, num_experts, k)
    if pattern == "one_expert":
        assert plan.counts.tolist() == [0] * (num_experts - k) + [batch] * k
    if pattern == "some_empty" and k < num_experts:
        assert int((plan.counts == 0).sum()) >= 1


@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 2, id="E4-k2"), pytest.param(8, 3, id="E8-k3")]
)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(9, id="B9")])
def test_noisy_plan_matches_reference(num_experts, k, batch):
    g = torch.Generator().manual_seed(num_experts * 10 + k)
    logits = torch.randn(batch, num_experts, generator=g).to(DEVICE)
    noise = (torch.randn(batch, num_experts, generator=g) / num_experts).to(DEVICE)
    plan = route_triton(logits, k, noise)
    assert_plans_equal(plan, route_reference(logits, k, noise))
    # The noise picks the gates, not probs.
    torch.testing.assert_close(plan.probs, torch.softmax(logits, -1), **F32_TOL)


@pytest.mark.parametrize(
    ("batch", "num_experts", "k"),
    [
        # More images than one block (BLOCK_B = 2048 // BLOCK_E): counts and positions carry over.
        pytest.param(700, 5, 2, id="B700-E5-k2"),
        pytest.param(300, 16, 4, id="B300-E16-k4"),
        pytest.param(130, 64, 3, id="B130-E64-k3"),
    ],
)
def test_several_blocks_of_images(batch, num_experts, k):
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, num_experts, generator=g).to(DEVICE)
    noise = (torch.randn(batch, num_experts, generator=g) / num_experts).to(DEVICE)
    assert_plans_equal(route_triton(logits, k, noise), route_reference(logits, k, noise))


@pytest.mark.parametrize(
    ("logits_dtype", "noise_dtype"),
    [
        pytest.param(torch.float64, torch.float64, id="fp64"),
        pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
        pytest.param(torch.float16, torch.float32, id="fp16-noise-fp32"),
        pytest.param(torch.float32, torch.bfloat16, id="fp32-noise-bf16"),
    ],
)
def test_any_float_dtype_routes_in_float32(logits_dtype, noise_dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, generator=g).to(logits_dtype).to(DEVICE)
    noise = (torch.randn(6, 5, generator=g) / 5).to(noise_dtype).to(DEVICE)
    plan = route_triton(logits, 2, noise)
    assert_plans_equal(plan, route_reference(logits, 2, noise))


def test_public_function_backend_triton(make_routing):
    logits = make_logits(5, 4, 2, "random", 1, make_routing)
    noise = torch.randn(5, 4, device=DEVICE) / 4
    plan = route(logits, 2, noise, backend="triton")
    assert_plans_equal(plan, route_reference(logits, 2, noise))
    assert_plans_equal(plan, route_triton(logits, 2, noise))


def test_non_contiguous_logits():
    wide = torch.randn(6, 10, device=DEVICE)
    logits = wide[:, ::2]  # [6, 5], stride 2
    assert_plans_equal(route_triton(logits, 3), route_reference(logits, 3))


def test_empty_batch():
    logits = torch.randn(0, 4, device=DEVICE, requires_grad=True)
    plan = route(logits, 2, backend="triton")
    assert_plans_equal(plan, route_reference(logits, 2))
    assert plan.offsets.tolist() == [0] * 5 and plan.counts.tolist() == [0] * 4
    (grad,) = torch.autograd.grad(plan.gates.sum(), logits)
    assert grad.shape == (0, 4)


def test_ties_go_to_the_lowest_index():
    # Exact ties, where the reference's order is whatever torch.topk does: our rule is documented.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 1.0], [3.0, 0.0, 3.0, 3.0]], device=DEVICE)
    plan = route_triton(logits, 3)
    assert plan.experts.tolist() == [[0, 1, 2], [1, 2, 0], [0, 2, 3]]
    check_plan_is_consistent(plan)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
def test_nan_logits_still_give_a_valid_plan():
    # Only reachable with check_values=False: the gates are garbage but no index is out of range.
    logits = torch.tensor([[0.0, math.nan, 1.0, 2.0], [math.nan] * 4, [1.0, 2.0, 3.0, 4.0]], device=DEVICE)
    plan = route(logits, 2, check_values=False, backend="triton")
    check_plan_is_consistent(plan)
    assert plan.experts[2].tolist() == [3, 2]


def test_buffers_fully_written(monkeypatch, make_routing):
    logits = make_logits(9, 5, 3, "some_empty", 4, make_routing).requires_grad_(True)
    noise = (torch.randn(9, 5, device=DEVICE) / 5).requires_grad_(True)
    with prefilled_buffers(monkeypatch):
        plan = route_triton(logits, 3, noise)
        outputs = (plan.gates, plan.probs, plan.noisy_logits)
        loss = sum((t * torch.randn(t.shape, device=DEVICE)).sum() for t in outputs)
        grads = torch.autograd.grad(loss, (logits, noise))
    for name, t in plan._asdict().items():
        assert_all_written(t, name)
    for name, g in zip(("logits", "noise"), grads, strict=True):
        assert_all_written(g, f"grad {name}")
    assert_plans_equal(plan, route_reference(logits, 3, noise))


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_experts", "k"), EK_CASES)
@pytest.mark.parametrize(
    "outputs",
    [
        pytest.param(("gates",), id="gates"),
        pytest.param(("gates", "probs", "noisy_logits"), id="all"),
        pytest.param(("probs",), id="probs"),
    ],
)
def test_gradients_match_reference(make_routing, num_experts, k, outputs):
    # make_routing separates the top-k by >= 1.5, so the noise never changes the choice.
    base = make_logits(5, num_experts, k, "random", num_experts * 10 + k, make_routing)
    noise0 = torch.randn(base.shape, device=DEVICE) / (4 * num_experts)
    leaves = [base.clone().requires_grad_(True), noise0.clone().requires_grad_(True)]
    ref_leaves = [base.clone().requires_grad_(True), noise0.clone().requires_grad_(True)]
    plan = route_triton(leaves[0], k, leaves[1])
    ref = route_reference(ref_leaves[0], k, ref_leaves[1])
    assert torch.equal(plan.experts, ref.experts)
    weights = {name: torch.randn(getattr(ref, name).shape, device=DEVICE) for name in outputs}

    def loss(p):
        return sum((getattr(p, name) * w).sum() for name, w in weights.items())

    got = torch.autograd.grad(loss(plan), leaves, allow_unused=True)
    want = torch.autograd.grad(loss(ref), ref_leaves, allow_unused=True)
    for name, g, w in zip(("logits", "noise"), got, want, strict=True):
        if w is None:  # probs only: the noise does not reach the loss
            assert g is None or bool((g == 0).all()), name
            continue
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, **F32_TOL, msg=f"grad {name}")


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
)
def test_gradient_dtype_follows_logits(make_routing, dtype):
    base = make_logits(4, 5, 2, "random", 2, make_routing).to(dtype)
    logits = base.clone().requires_grad_(True)
    ref_logits = base.clone().requires_grad_(True)
    weights = torch.randn(4, 2, device=DEVICE)
    (got,) = torch.autograd.grad((route_triton(logits, 2).gates * weights).sum(), logits)
    (want,) = torch.autograd.grad((route_reference(ref_logits, 2).gates * weights).sum(), ref_logits)
    assert got.dtype == dtype
    # One rounding of a float32 gradient to bf16 / fp16.
    atol, rtol = (1e-2, 1.6e-2) if dtype == torch.bfloat16 else (1e-3, 2e-3)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 1, id="E4-k1"), pytest.param(5, 3, id="E5-k3")]
)
def test_gradcheck(make_routing, num_experts, k):
    # Routing runs in float32 by contract (see test_route.py::test_gates_gradcheck): larger step
    # and tolerance than float64 defaults.
    logits = make_logits(3, num_experts, k, "some_empty", k, make_routing).double().requires_grad_(True)
    noise = (torch.randn(3, num_experts, device=DEVICE, dtype=torch.float64) / 8).requires_grad_(True)

    def fn(lg, nz):
        plan = route_triton(lg, k, nz)
        return plan.gates, plan.probs, plan.noisy_logits

    assert torch.autograd.gradcheck(fn, (logits, noise), eps=1e-3, atol=2e-4, rtol=1e-3)


def test_backward_is_deterministic(make_routing):
    logits = make_logits(40, 8, 3, "random", 5, make_routing).requires_grad_(True)
    weights = torch.randn(40, 3, device=DEVICE)
    plan = route_triton(logits, 3)
    first = torch.autograd.grad((plan.gates * weights).sum(), logits, retain_graph=True)[0]
    for _ in range(2):
        again = torch.autograd.grad((plan.gates * weights).sum(), logits, retain_graph=True)[0]
        assert torch.equal(first, again)
        assert_plans_equal(route_triton(logits, 3), plan)


def test_double_backward_raises(make_routing):
    logits = make_logits(3, 4, 2, "random", 6, make_routing).requires_grad_(True)
    (grad,) = torch.autograd.grad(route_triton(logits, 2).gates.sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# --- limits, torch.library --------------------------------------------------------------------


def test_limits_raise_clear_errors():
    with pytest.raises(ValueError, match=f"up to {MAX_BATCH} images"):
        route(torch.zeros(MAX_BATCH + 1, 2, device=DEVICE), 1, backend="triton")
    with pytest.raises(ValueError, match=f"at most {MAX_EXPERTS} experts"):
        route(torch.zeros(2, MAX_EXPERTS + 1, device=DEVICE), 1, backend="triton")


@pytest.mark.parametrize("with_noise", [pytest.param(False, id="clean"), pytest.param(True, id="noisy")])
def test_opcheck(make_routing, with_noise):
    logits = make_logits(5, 4, 2, "random", 7, make_routing).requires_grad_(True)
    noise = (torch.randn(5, 4, device=DEVICE) / 4).requires_grad_(True) if with_noise else None
    torch.library.opcheck(torch.ops.moce_triton.route_fwd.default, (logits, noise, 2))
    plan = route_triton(logits.detach(), 2, None if noise is None else noise.detach())
    grads = (torch.randn(5, 2, device=DEVICE), None, torch.randn(5, 4, device=DEVICE))
    args = (plan.noisy_logits, plan.probs, plan.experts, *grads)
    torch.library.opcheck(torch.ops.moce_triton.route_bwd.default, args)


def test_torch_compile(make_routing):
    logits = make_logits(6, 5, 2, "random", 8, make_routing).requires_grad_(True)
    weights = torch.randn(6, 2, device=DEVICE)

    def step(lg):
        return (route_triton(lg, 2).gates * weights).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (got,) = torch.autograd.grad(compiled(logits), logits)
    (want,) = torch.autograd.grad(step(logits), logits)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- ahead-of-time compile for the GPU ---------------------------------------------------------

_MOD = "moce_kernels.route.triton"
_FWD_SIG = {
    **dict.fromkeys(("logits_ptr", "noise_ptr"), "*fp32"),
    "gates_ptr": "*fp32",
    "experts_ptr": "*i64",
    "probs_ptr": "*fp32",
    "noisy_ptr": "*fp32",
    **dict.fromkeys(
        ("counts_ptr", "offsets_ptr", "sorted_slots_ptr", "sorted_images_ptr", "inverse_ptr"), "*i64"
    ),
    "B": "i32",
    "E": "i32",
    **dict.fromkeys(("K", "HAS_NOISE", "BLOCK_B", "BLOCK_E"), "constexpr"),
}
_BWD_SIG = {
    "noisy_ptr": "*fp32",
    "probs_ptr": "*fp32",
    "experts_ptr": "*i64",
    **dict.fromkeys(
        ("grad_gates_ptr", "grad_probs_ptr", "grad_noisy_ptr", "grad_wrt_noisy_ptr", "grad_wrt_logits_ptr"),
        "*fp32",
    ),
    "B": "i32",
    "E": "i32",
    **dict.fromkeys(
        ("K", "HAS_GRAD_GATES", "HAS_GRAD_PROBS", "HAS_GRAD_NOISY", "BLOCK_B", "BLOCK_E"), "constexpr"
    ),
}
AOT_SPECS = [
    (
        "fwd-fp32-E4-k1",
        _MOD,
        "route_fwd_kernel",
        _FWD_SIG,
        dict(K=1, HAS_NOISE=False, BLOCK_B=512, BLOCK_E=4),
    ),
    (
        "fwd-bf16-fp16noise-E5-k3",
        _MOD,
        "route_fwd_kernel",
        {**_FWD_SIG, "logits_ptr": "*bf16", "noise_ptr": "*fp16"},
        dict(K=3, HAS_NOISE=True, BLOCK_B=256, BLOCK_E=8),
    ),
    (
        "bwd-all",
        _MOD,
        "route_bwd_kernel",
        _BWD_SIG,
        dict(K=3, HAS_GRAD_GATES=True, HAS_GRAD_PROBS=True, HAS_GRAD_NOISY=True, BLOCK_B=256, BLOCK_E=8),
    ),
    (
        "bwd-gates-bf16",
        _MOD,
        "route_bwd_kernel",
        {**_BWD_SIG, "grad_gates_ptr": "*bf16"},
        dict(K=2, HAS_GRAD_GATES=True, HAS_GRAD_PROBS=False, HAS_GRAD_NOISY=False, BLOCK_B=512, BLOCK_E=4),
    ),
]


@pytest.mark.parametrize("label", sm90_labels(AOT_SPECS))
def test_kernels_compile_for_sm90(sm90_results, label):
    assert_compiled_for_sm90(sm90_results[label])


def test_module_exports_the_convention_name():
    # _backend finds the implementation by name: moce_kernels/route/triton.py::route_triton.
    assert _backend.implementation("route", "triton") is route_triton_module.route_triton
