"""route: against a per-image loop (softmax, top-k by Python sort), and the plan's invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moce_kernels import route

#: (E, k) for E in {1, 4, 5} and k = 1..E.
EK_CASES = [pytest.param(e, k, id=f"E{e}-k{k}") for e in (1, 4, 5) for k in range(1, e + 1)]


def route_loop(logits: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> dict[str, object]:
    """One image at a time: softmax in float32, top-k by a Python sort, plan by Python loops."""
    batch, num_experts = logits.shape
    gates = torch.full((batch, k), float("nan"))
    probs = torch.full((batch, num_experts), float("nan"))
    experts: list[list[int]] = []
    for b in range(batch):
        clean = logits[b].float()
        noisy = clean if noise is None else clean + noise[b].float()
        p = torch.softmax(noisy, dim=0)
        chosen = sorted(range(num_experts), key=lambda e: -float(p[e]))[:k]
        experts.append(chosen)
        for j, e in enumerate(chosen):
            gates[b, j] = p[e]
        probs[b] = torch.softmax(clean, dim=0)
    counts = [sum(row.count(e) for row in experts) for e in range(num_experts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    sorted_slots = [
        b * k + j for e in range(num_experts) for b in range(batch) for j in range(k) if experts[b][j] == e
    ]
    inverse = [0] * (batch * k)
    for row, slot in enumerate(sorted_slots):
        inverse[slot] = row
    return {
        "gates": gates,
        "probs": probs,
        "experts": experts,
        "counts": counts,
        "offsets": offsets,
        "sorted_slots": sorted_slots,
        "sorted_images": [s // k for s in sorted_slots],
        "inverse": inverse,
    }


def assert_plan_matches_loop(plan, logits, k, noise=None) -> None:
    want = route_loop(logits, k, noise)
    torch.testing.assert_close(plan.gates, want["gates"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plan.probs, want["probs"], atol=1e-6, rtol=1e-5)
    noisy = logits.float() if noise is None else logits.float() + noise.float()
    torch.testing.assert_close(plan.noisy_logits, noisy, atol=0, rtol=0)
    assert plan.experts.tolist() == want["experts"]
    assert plan.counts.tolist() == want["counts"]
    assert plan.offsets.tolist() == want["offsets"]
    assert plan.sorted_slots.tolist() == want["sorted_slots"]
    assert plan.sorted_images.tolist() == want["sorted_images"]
    assert plan.inverse.tolist() == want["inverse"]
    for name in ("experts", "counts", "offsets", "sorted_slots", "sorted_images", "inverse"):
        assert getattr(plan, name).dtype == torch.int64, name
    for name in ("gates", "probs", "noisy_logits"):
        assert getattr(plan, name).dtype == torch.float32, name


@pytest.mark.parametrize(("num_experts", "k"), EK_CASES)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(6, id="B6")])
@pytest.mark.parametrize("with_noise", [pytest.param(False, id="clean"), pytest.param(True, id="noisy")])
def test_route_matches_per_image_loop(num_experts, k, batch, with_noise):
    logits = torch.randn(batch, num_experts)
    noise = torch.randn(batch, num_experts) / num_experts if with_noise else None
    plan = route(logits, k, noise)
    assert_plan_matches_loop(plan, logits, k, noise)
    assert (plan.batch_size, plan.num_experts, plan.k) == (batch, num_experts, k)


def test_noise_picks_the_gates_but_not_probs():
    # Noise large enough to flip the winner: gates follow the noisy logits, probs the clean ones.
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    noise = torch.tensor([[-3.0, 0.0, 0.0]])
    plan = route(logits, 1, noise)
    assert plan.experts.tolist() == [[1]]
    torch.testing.assert_close(plan.gates, torch.softmax(logits + noise, -1)[:, 1:2])
    torch.testing.assert_close(plan.probs, torch.softmax(logits, -1))


@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 1, id="E4-k1"), pytest.param(5, 3, id="E5-k3")]
)
def test_gates_are_not_renormalised(num_experts, k):
    logits = torch.randn(8, num_experts)
    plan = route(logits, k)
    full = torch.softmax(logits, -1)
    torch.testing.assert_close(plan.gates, torch.gather(full, 1, plan.experts))
    # Renormalised gates would sum to 1; the top-k of a softmax over E > k experts sums to less.
    assert bool((plan.gates.sum(-1) < 1 - 1e-4).all())


def test_k_equal_to_e_gates_sum_to_one():
    plan = route(torch.randn(5, 4), 4)
    torch.testing.assert_close(plan.gates.sum(-1), torch.ones(5))
    assert sorted(plan.experts[0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("pattern", ["random", "one_expert", "some_empty"])
@pytest.mark.parametrize(("num_experts", "k"), EK_CASES)
def test_plan_invariants_under_forced_patterns(make_routing, pattern, num_experts, k):
    batch = 7
    logits, plan = make_routing(batch, num_experts, k, pattern, seed=num_experts * 10 + k)
    assert_plan_matches_loop(plan, logits, k)
    experts = plan.experts.tolist()
    slots = batch * k
    # inverse is the inverse permutation of sorted_slots.
    assert sorted(plan.sorted_slots.tolist()) == list(range(slots))
    assert plan.sorted_slots[plan.inverse].tolist() == list(range(slots))
    assert plan.inverse[plan.sorted_slots].tolist() == list(range(slots))
    offsets = plan.offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == slots
    for e in range(num_experts):
        rows = plan.sorted_slots[offsets[e] : offsets[e + 1]].tolist()
        # Exactly the slots choosing e, in image-then-choice order.
        assert rows == [s for s in range(slots) if experts[s // k][s % k] == e]
        assert plan.counts[e] == len(rows)
    if pattern == "one_expert":
        assert plan.counts.tolist() == [0] * (num_experts - k) + [batch] * k
    if pattern == "some_empty" and k < num_experts:
        assert int((plan.counts == 0).sum()) >= 1


def test_empty_batch():
    logits = torch.randn(0, 4, requires_grad=True)
    plan = route(logits, 2)
    assert plan.gates.shape == (0, 2) and plan.experts.shape == (0, 2)
    assert plan.probs.shape == (0, 4)
    assert plan.counts.tolist() == [0, 0, 0, 0]
    assert plan.offsets.tolist() == [0, 0, 0, 0, 0]
    assert plan.sorted_slots.numel() == plan.sorted_images.numel() == plan.inverse.numel() == 0
    assert (plan.batch_size, plan.num_experts, plan.k) == (0, 4, 2)
    (grad,) = torch.autograd.grad(plan.gates.sum(), logits)
    assert grad.shape == (0, 4)


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.float64, id="fp64"),
        pytest.param(torch.bfloat16, id="bf16"),
        pytest.param(torch.float16, id="fp16"),
    ],
)
def test_routing_runs_in_float32_for_any_float_dtype(dtype):
    logits = torch.randn(6, 5).to(dtype)
    plan = route(logits, 2)
    assert_plan_matches_loop(plan, logits, 2)


def test_gate_gradient_matches_loop_autograd(make_routing):
    # Well-separated top-k, so the choice is the same in both computations.
    logits, _ = make_routing(6, 5, 3, "random", seed=3)
    logits = logits.clone().requires_grad_(True)
    weights = torch.randn(6, 3)
    plan = route(logits, 3)
    (got,) = torch.autograd.grad((plan.gates * weights).sum(), logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    loss = 0.0
    for b in range(6):
        p = torch.softmax(ref_logits[b], 0)
        for j, e in enumerate(plan.experts[b].tolist()):
            loss = loss + weights[b, j] * p[e]
    (want,) = torch.autograd.grad(loss, ref_logits)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 1, id="E4-k1"), pytest.param(5, 2, id="E5-k2")]
)
def test_gates_gradcheck(make_routing, num_experts, k):
    # Routing runs in float32 by contract (the plan's gates are float32 even for float64 logits),
    # so the finite differences use a larger step and tolerance than float64 gradcheck's
    # defaults: eps = 1e-3 keeps float32 rounding (~1e-7 / 2e-3 = 5e-5) under atol. The top-k is
    # separated by >= 1.5, so the perturbation never changes the choice.
    logits, _ = make_routing(3, num_experts, k, "some_empty", seed=k)
    logits = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lg: route(lg, k).gates, (logits,), eps=1e-3, atol=2e-4, rtol=1e-3)


# --- bad input -------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param(dict(logits=torch.randn(4)), ValueError, "logits", id="logits-1d"),
    pytest.param(dict(logits=torch.randn(2, 3, 4)), ValueError, "logits", id="logits-3d"),
    pytest.param(dict(logits=torch.ones(2, 4, dtype=torch.int64)), TypeError, "logits", id="logits-int"),
    pytest.param(dict(logits=[[0.0, 1.0]]), TypeError, "logits", id="logits-not-tensor"),
    pytest.param(dict(logits=torch.randn(2, 0), k=1), ValueError, "logits", id="no-experts"),
    pytest.param(dict(k=0), ValueError, "k", id="k0"),
    pytest.param(dict(k=5), ValueError, "k", id="k-E+1"),
    pytest.param(dict(k=-1), ValueError, "k", id="k-negative"),
    pytest.param(dict(k=True), TypeError, "k", id="k-bool"),
    pytest.param(dict(k=2.0), TypeError, "k", id="k-float"),
    pytest.param(dict(noise=torch.randn(2, 3)), ValueError, "noise", id="noise-shape"),
    pytest.param(dict(noise=torch.randn(4)), ValueError, "noise", id="noise-1d"),
    pytest.param(dict(noise=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "noise", id="noise-int"),
    pytest.param(dict(logits=torch.tensor([[0.0, math.nan, 1.0, 2.0]] * 2)), ValueError, "logits", id="nan"),
    pytest.param(dict(logits=torch.tensor([[0.0, math.inf, 1.0, 2.0]] * 2)), ValueError, "logits", id="inf"),
    pytest.param(
        dict(logits=torch.tensor([[0.0, math.nan, 1.0, 2.0]] * 2), check_values=True),
        ValueError,
        "logits",
        id="nan-check-values",
    ),
    pytest.param(dict(noise=torch.full((2, 4), math.nan)), ValueError, "noise", id="noise-nan"),
    pytest.param(dict(backend="fast"), ValueError, "backend", id="backend-unknown"),
    pytest.param(dict(backend="cuda"), RuntimeError, "cuda", id="backend-cuda-on-cpu-tensors"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_INPUTS)
def test_bad_input_raises(overrides, error, match):
    args = dict(logits=torch.randn(2, 4), k=2, noise=None)
    args.update(overrides)
    backend = args.pop("backend", "auto")
    check_values = args.pop("check_values", None)
    with pytest.raises(error, match=match):
        route(args["logits"], args["k"], args["noise"], check_values=check_values, backend=backend)


def test_check_values_false_skips_the_host_read():
    logits = torch.tensor([[0.0, math.nan, 1.0, 2.0]])
    plan = route(logits, 1, check_values=False)
    assert bool(plan.probs.isnan().all())


# --- property --------------------------------------------------------------------------------


@st.composite
def _route_case(draw):
    num_experts = draw(st.integers(1, 6))
    return dict(
        batch=draw(st.integers(1, 8)),
        num_experts=num_experts,
        k=draw(st.integers(1, num_experts)),
        noise=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=25, deadline=None)
@given(case=_route_case())
def test_property_route_matches_loop(case):
    g = torch.Generator().manual_seed(case["seed"])
    logits = torch.randn(case["batch"], case["num_experts"], generator=g)
    noise = torch.randn(logits.shape, generator=g) / case["num_experts"] if case["noise"] else None
    assert_plan_matches_loop(route(logits, case["k"], noise), logits, case["k"], noise)
