"""dispatch: against a Python loop that stacks x[b] for every (expert, image, choice) in order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from moce_kernels import dispatch, route
from tests.ops._helpers import PATTERNS, routed_images

#: (E, k) for E in {1, 4, 5} and k = 1..E.
EK_CASES = [pytest.param(e, k, id=f"E{e}-k{k}") for e in (1, 4, 5) for k in range(1, e + 1)]


def dispatch_loop(x: torch.Tensor, experts: list[list[int]], num_experts: int) -> torch.Tensor:
    """Rows of expert 0, then expert 1, ...; inside an expert by image, then choice."""
    rows = [x[b] for e in range(num_experts) for b, chosen in enumerate(experts) for c in chosen if c == e]
    if not rows:
        return x[:0].clone()
    return torch.stack(rows)


def check_forward_and_grad(x: torch.Tensor, plan, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Forward bit-exact against the loop; x's gradient against autograd of the loop."""
    experts = plan.experts.tolist()
    x_op = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = dispatch(x_op, plan)
    want = dispatch_loop(x_ref, experts, plan.num_experts)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, want, atol=0, rtol=0)

    grad_out = torch.randn(out.shape).to(x.dtype)
    (got,) = torch.autograd.grad(out, x_op, grad_out)
    (ref,) = torch.autograd.grad(want, x_ref, grad_out)
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    # And spelled out: image b's gradient is the sum of the gradients of its k rows.
    acc = torch.promote_types(x.dtype, torch.float32)
    for b in range(x.shape[0]):
        rows_of_b = (plan.sorted_images == b).nonzero().flatten()
        assert rows_of_b.numel() == plan.k
        torch.testing.assert_close(got[b].to(acc), grad_out[rows_of_b].to(acc).sum(0), atol=atol, rtol=rtol)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("num_experts", "k"), EK_CASES)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(5, id="B5")])
def test_dispatch_matches_loop(make_routing, pattern, num_experts, k, batch):
    _, plan = make_routing(batch, num_experts, k, pattern, seed=batch * 100 + num_experts * 10 + k)
    x = torch.randn(batch, 3, 13, 21)
    check_forward_and_grad(x, plan, atol=1e-6, rtol=1e-6)


def test_all_images_on_one_expert(make_routing):
    _, plan = make_routing(6, 4, 1, "one_expert")
    assert plan.counts.tolist() == [0, 0, 0, 6]
    x = torch.randn(6, 2, 5, 5)
    out = dispatch(x, plan)
    # Every image lands on expert 3, in image order.
    torch.testing.assert_close(out, x, atol=0, rtol=0)
    check_forward_and_grad(x, plan)


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [
        pytest.param(torch.float32, 1e-6, 1e-6, id="fp32"),
        pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
        # The gradient sums k rows in bf16/fp16; the summation order may differ from the loop's.
        pytest.param(torch.bfloat16, 2e-2, 1.6e-2, id="bf16"),
        pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
    ],
)
def test_dispatch_dtypes(make_routing, dtype, atol, rtol):
    _, plan = make_routing(4, 5, 3, "random", seed=7)
    check_forward_and_grad(torch.randn(4, 6, 7, 3).to(dtype), plan, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "feature_shape",
    [pytest.param((), id="1d"), pytest.param((7,), id="2d"), pytest.param((2, 1, 1), id="4d-1x1")],
)
def test_dispatch_any_rank(make_routing, feature_shape):
    _, plan = make_routing(3, 4, 2, "random", seed=1)
    check_forward_and_grad(torch.randn(3, *feature_shape), plan, atol=1e-6, rtol=1e-6)


def test_dispatch_integer_input_is_gathered_exactly(make_routing):
    _, plan = make_routing(4, 4, 2, "some_empty", seed=2)
    x = torch.arange(4 * 3).view(4, 3)
    torch.testing.assert_close(dispatch(x, plan), dispatch_loop(x, plan.experts.tolist(), 4), atol=0, rtol=0)


def test_dispatch_empty_batch():
    plan = route(torch.randn(0, 4), 2)
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    out = dispatch(x, plan)
    assert out.shape == (0, 3, 5, 5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == (0, 3, 5, 5)


def test_dispatch_gradcheck(make_routing):
    _, plan = make_routing(3, 4, 2, "random", seed=5)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dispatch(t, plan), (x,))


def test_dispatch_gradcheck_one_expert_k_equal_e(make_routing):
    _, plan = make_routing(2, 3, 3, "one_expert")
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dispatch(t, plan), (x,))


# --- bad input -------------------------------------------------------------------------------


def test_wrong_batch_size_raises(make_routing):
    _, plan = make_routing(3, 4, 2)
    with pytest.raises(ValueError, match="batch size"):
        dispatch(torch.randn(4, 2, 3, 3), plan)


def test_zero_dim_input_raises(make_routing):
    _, plan = make_routing(3, 4, 2)
    with pytest.raises(ValueError, match="batch size"):
        dispatch(torch.tensor(1.0), plan)


@pytest.mark.parametrize(
    "bad_plan",
    [
        pytest.param("tuple", id="plain-tuple"),
        pytest.param("dict", id="dict"),
        pytest.param(None, id="none"),
    ],
)
def test_non_plan_raises(make_routing, bad_plan):
    _, plan = make_routing(3, 4, 2)
    bad = {"tuple": tuple(plan), "dict": plan._asdict(), None: None}[bad_plan]
    with pytest.raises(TypeError, match="plan"):
        dispatch(torch.randn(3, 2), bad)


def test_non_tensor_input_raises(make_routing):
    _, plan = make_routing(3, 4, 2)
    with pytest.raises(TypeError, match="x"):
        dispatch([[0.0]] * 3, plan)


@pytest.mark.parametrize(
    ("backend", "error"),
    [
        pytest.param("fast", ValueError, id="unknown"),
        pytest.param("cuda", RuntimeError, id="cuda-on-cpu-tensors"),
    ],
)
def test_bad_backend_raises(make_routing, backend, error):
    _, plan = make_routing(3, 4, 2)
    with pytest.raises(error, match="backend"):
        dispatch(torch.randn(3, 2), plan, backend=backend)


# --- property --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(case=routed_images())
def test_property_dispatch_matches_loop(make_routing, case):
    _, plan = make_routing(case["batch"], case["num_experts"], case["k"], case["pattern"], seed=case["seed"])
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], 2, case["height"], case["width"], generator=g)
    check_forward_and_grad(x, plan, atol=1e-6, rtol=1e-6)
