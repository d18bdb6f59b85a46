"""combine: against a Python loop ``out[b] = sum_j gates[b, j] * y[row of slot (b, j)]``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

from moce_kernels import combine, route
from moce_kernels.combine.reference import combine_reference
from tests.ops._helpers import PATTERNS, routed_images

#: (E, k) for E in {1, 4, 5} and k = 1..E.
EK_CASES = [pytest.param(e, k, id=f"E{e}-k{k}") for e in (1, 4, 5) for k in range(1, e + 1)]


def combine_loop(
    y: torch.Tensor, gates: torch.Tensor, experts: list[list[int]], order: list[int]
) -> torch.Tensor:
    """Differentiable loop in the promoted dtype of y and gates; ``order`` lists slots by row."""
    row_of_slot = {slot: row for row, slot in enumerate(order)}
    k = gates.shape[1]
    outs = []
    for b in range(len(experts)):
        acc = 0.0
        for j in range(k):
            acc = acc + gates[b, j] * y[row_of_slot[b * k + j]]
        outs.append(acc)
    if not outs:
        return y.new_zeros(0, *y.shape[1:])
    return torch.stack(outs)


def check_against_loop(y, gates, plan, expert_order, *, atol, rtol, use_plan_gates=False):
    """Forward and both gradients of combine(y, plan[, gates]) against autograd of the loop."""
    order = expert_order(plan.experts.tolist(), plan.num_experts)
    y_op, g_op = y.detach().clone().requires_grad_(True), gates.detach().clone().requires_grad_(True)
    out = combine(y_op, plan, None if use_plan_gates else g_op)
    assert out.dtype == y.dtype

    # The loop runs in float64 from the same (possibly low-precision) values.
    y_ref = y.detach().double().requires_grad_(True)
    g_ref = gates.detach().double().requires_grad_(True)
    want = combine_loop(y_ref, g_ref, plan.experts.tolist(), order)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)

    grad_out = torch.randn(out.shape).to(y.dtype)
    grad_y_ref, grad_g_ref = torch.autograd.grad(want, (y_ref, g_ref), grad_out.double())
    grad_y = torch.autograd.grad(out, y_op, grad_out, retain_graph=not use_plan_gates)[0]
    torch.testing.assert_close(grad_y.double(), grad_y_ref, atol=atol, rtol=rtol)
    if not use_plan_gates:
        (grad_g,) = torch.autograd.grad(out, g_op, grad_out)
        assert grad_g.dtype == gates.dtype
        # A gate's gradient sums over all features of its row: the tolerance grows with the root.
        features = math.prod(y.shape[1:])
        torch.testing.assert_close(grad_g.double(), grad_g_ref, atol=atol * math.sqrt(features), rtol=rtol)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("num_experts", "k"), EK_CASES)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(5, id="B5")])
def test_combine_matches_loop(make_routing, expert_order, pattern, num_experts, k, batch):  # noqa: PLR0917
    _, plan = make_routing(batch, num_experts, k, pattern, seed=batch * 100 + num_experts * 10 + k)
    y = torch.randn(batch * k, 3, 13, 21)
    gates = torch.rand(batch, k)
    check_against_loop(y, gates, plan, expert_order, atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 1, id="E4-k1"), pytest.param(5, 3, id="E5-k3")]
)
def test_combine_with_plan_gates(make_routing, expert_order, num_experts, k):
    _, plan = make_routing(4, num_experts, k, "random", seed=11)
    y = torch.randn(4 * k, 2, 5, 3)
    check_against_loop(y, plan.gates, plan, expert_order, atol=1e-5, rtol=1.3e-6, use_plan_gates=True)


def test_gradient_reaches_router_logits_through_plan_gates(make_routing, expert_order):
    logits, _ = make_routing(5, 4, 2, "random", seed=4)
    logits = logits.clone().requires_grad_(True)
    plan = route(logits, 2)
    y = torch.randn(10, 3, 4, 4)
    grad_out = torch.randn(5, 3, 4, 4)
    (got,) = torch.autograd.grad(combine(y, plan), logits, grad_out)

    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_gates = torch.gather(torch.softmax(ref_logits, -1), 1, plan.experts)
    order = expert_order(plan.experts.tolist(), 4)
    (want,) = torch.autograd.grad(
        combine_loop(y, ref_gates, plan.experts.tolist(), order), ref_logits, grad_out
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [
        pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
        pytest.param(torch.float32, 1e-5, 1.3e-6, id="fp32"),
        # One rounding of the float32 accumulation to bf16 / fp16 (eps 7.8e-3 / 9.8e-4).
        pytest.param(torch.bfloat16, 2e-2, 1.6e-2, id="bf16"),
        pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    ],
)
def test_combine_dtypes(make_routing, expert_order, dtype, atol, rtol):
    _, plan = make_routing(4, 5, 3, "random", seed=7)
    y = torch.randn(12, 6, 7, 3).to(dtype)
    gates = torch.rand(4, 3).to(dtype)
    check_against_loop(y, gates, plan, expert_order, atol=atol, rtol=rtol)


def test_bf16_y_with_float32_gates(make_routing, expert_order):
    _, plan = make_routing(3, 4, 2, "random", seed=8)
    y = torch.randn(6, 4, 5).bfloat16()
    check_against_loop(y, torch.rand(3, 2), plan, expert_order, atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize(
    "feature_shape",
    [pytest.param((), id="1d"), pytest.param((7,), id="2d"), pytest.param((2, 1, 1), id="4d-1x1")],
)
def test_combine_any_rank(make_routing, expert_order, feature_shape):
    _, plan = make_routing(3, 4, 2, "some_empty", seed=1)
    check_against_loop(
        torch.randn(6, *feature_shape), torch.rand(3, 2), plan, expert_order, atol=1e-6, rtol=1e-6
    )


def test_all_images_on_one_expert(make_routing, expert_order):
    _, plan = make_routing(6, 4, 1, "one_expert")
    y = torch.randn(6, 2, 3, 3)
    gates = torch.rand(6, 1)
    torch.testing.assert_close(combine(y, plan, gates), y * gates.view(6, 1, 1, 1))
    check_against_loop(y, gates, plan, expert_order, atol=1e-6, rtol=1e-6)


def test_combine_empty_batch():
    logits = torch.randn(0, 4, requires_grad=True)
    plan = route(logits, 2)
    y = torch.randn(0, 3, 5, 5, requires_grad=True)
    gates = torch.rand(0, 2, requires_grad=True)
    out = combine(y, plan, gates)
    assert out.shape == (0, 3, 5, 5)
    grad_y, grad_g = torch.autograd.grad(out.sum(), (y, gates))
    assert grad_y.shape == (0, 3, 5, 5) and grad_g.shape == (0, 2)
    # Through the plan's own gates back to the router.
    (grad_logits,) = torch.autograd.grad(combine(y, plan).sum(), logits)
    assert grad_logits.shape == (0, 4)


@pytest.mark.parametrize(
    ("num_experts", "k", "pattern"),
    [
        pytest.param(4, 2, "random", id="E4-k2-random"),
        pytest.param(5, 1, "one_expert", id="E5-k1-one-expert"),
    ],
)
def test_combine_gradcheck(make_routing, num_experts, k, pattern):
    _, plan = make_routing(3, num_experts, k, pattern, seed=5)
    y = torch.randn(3 * k, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(3, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, g: combine(a, plan, gates=g), (y, gates))


def test_combine_gradcheck_plan_gates(make_routing):
    # plan.gates is float32 by contract, so only y is checked here (it is a constant below).
    _, plan = make_routing(3, 4, 2, "some_empty", seed=6)
    y = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: combine(a, plan), (y,))


# --- bad input -------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param(dict(y=torch.randn(5, 2)), ValueError, "rows", id="y-too-few-rows"),
    pytest.param(dict(y=torch.randn(7, 2)), ValueError, "rows", id="y-too-many-rows"),
    pytest.param(dict(y=torch.tensor(1.0)), ValueError, "rows", id="y-0d"),
    pytest.param(dict(y=torch.ones(6, 2, dtype=torch.int64)), TypeError, "y", id="y-int"),
    pytest.param(dict(y=[[0.0]] * 6), TypeError, "y", id="y-not-tensor"),
    pytest.param(dict(gates=torch.rand(3, 3)), ValueError, "gates", id="gates-wrong-k"),
    pytest.param(dict(gates=torch.rand(2, 2)), ValueError, "gates", id="gates-wrong-batch"),
    pytest.param(dict(gates=torch.rand(6)), ValueError, "gates", id="gates-1d"),
    pytest.param(dict(gates=torch.ones(3, 2, dtype=torch.int64)), TypeError, "gates", id="gates-int"),
    pytest.param(dict(plan="not-a-plan"), TypeError, "plan", id="plan-str"),
    pytest.param(dict(plan="tuple"), TypeError, "plan", id="plan-plain-tuple"),
    pytest.param(dict(backend="fast"), ValueError, "backend", id="backend-unknown"),
    pytest.param(dict(backend="cuda"), RuntimeError, "cuda", id="backend-cuda-on-cpu-tensors"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_INPUTS)
def test_bad_input_raises(make_routing, overrides, error, match):
    _, plan = make_routing(3, 4, 2)
    args = dict(y=torch.randn(6, 2), plan=plan, gates=None, backend="auto")
    args.update(overrides)
    if args["plan"] == "tuple":
        args["plan"] = tuple(plan)
    with pytest.raises(error, match=match):
        combine(args["y"], args["plan"], args["gates"], backend=args["backend"])


# --- property --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(case=routed_images())
def test_property_combine_matches_loop(make_routing, expert_order, case):
    batch, k = case["batch"], case["k"]
    _, plan = make_routing(batch, case["num_experts"], k, case["pattern"], seed=case["seed"])
    g = torch.Generator().manual_seed(case["seed"])
    y = torch.randn(batch * k, 2, case["height"], case["width"], generator=g)
    gates = torch.rand(batch, k, generator=g)
    check_against_loop(y, gates, plan, expert_order, atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("gates_need_grad", [False, True], ids=["plan-gates", "gates-with-grad"])
def test_reference_gradients_under_torch_compile(gates_need_grad):
    """The reference's autograd.Function (what the public op runs for it) traced by Dynamo +
    AOTAutograd gives eager's gradients. Its forward once returned ``out.to(out.dtype)`` (a
    no-op): with torch 2.11 the compiled gradients of y were then all zeros (the model's compiled
    gradients wrong; 2.14 was right)."""
    torch.manual_seed(0)
    plan = route(torch.randn(3, 4), 2, None, backend="reference")
    y = torch.randn(6, 5, requires_grad=True)
    gates = plan.gates.clone().requires_grad_(gates_need_grad)
    inputs = (y, gates) if gates_need_grad else (y,)

    def loss(y, gates):
        return combine_reference(y, plan, gates).square().sum()  # no host-side plan checks

    want = torch.autograd.grad(loss(y, gates), inputs)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(y, gates), inputs)
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
