"""route on the compiled kernels (moce_kernels._C): C++ on the CPU, CUDA on the GPU.

Every plan field against ``route_reference`` (index fields exactly), the gradients of gates,
probs and noisy_logits w.r.t. the logits and the noise against the reference's autograd, the
ops themselves through ``torch.ops.moce.route_fwd`` / ``_bwd`` (``opcheck``, bad input), the tie
rule, NaN logits, determinism. Inputs are tie-free (``make_routing``) wherever the reference's
top-k order is compared. Kernel-allocated buffers are NaN-filled by torch (deterministic mode's
``fill_uninitialized_memory``), so an element a kernel forgets to write fails the checks.
Skipped as a whole when the extension is not built.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from moce_kernels import route
from moce_kernels.route.reference import route_reference
from tests.conftest import make_routing_impl
from tests.ops._helpers import DEVICES, NEEDS_CUDA, skip_unless_extension_built

skip_unless_extension_built()

from moce_kernels.route import compiled  # noqa: E402  (needs the extension)

INDEX_FIELDS = ("experts", "counts", "offsets", "sorted_slots", "sorted_images", "inverse")
FLOAT_FIELDS = ("gates", "probs", "noisy_logits")

#: (B, E, k, pattern) with k = 1..E, B = 1, empty experts, every image on the same experts.
ROUTINGS = [
    pytest.param(1, 1, 1, "random", id="B1-E1-k1"),
    pytest.param(1, 4, 2, "random", id="B1-E4-k2"),
    *[pytest.param(6, 4, k, "random", id=f"B6-E4-k{k}") for k in range(1, 5)],
    pytest.param(7, 5, 3, "some_empty", id="B7-E5-k3-some-empty"),
    pytest.param(5, 4, 1, "one_expert", id="B5-E4-k1-one-expert"),
    pytest.param(5, 6, 3, "one_expert", id="B5-E6-k3-one-expert"),
    # More slots than one CUDA block (1024 threads) walks at a time.
    pytest.param(700, 8, 2, "random", id="B700-E8-k2"),
]


def assert_plan_matches(plan, want):
    for name in INDEX_FIELDS:
        got = getattr(plan, name)
        assert got.dtype == torch.int64, name
        assert torch.equal(got.cpu(), getattr(want, name).cpu()), name
    for name in FLOAT_FIELDS:
        got = getattr(plan, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.cpu(), getattr(want, name).cpu(), atol=1e-6, rtol=1e-5, msg=name)


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("batch", "num_experts", "k", "pattern"), ROUTINGS)
def test_plan_matches_reference(batch, num_experts, k, pattern, device):
    logits, want = make_routing_impl(batch, num_experts, k, pattern, seed=batch + 10 * k)
    plan = route(logits.to(device), k, backend=device)
    assert all(t.device.type == device for t in plan)
    assert_plan_matches(plan, want)


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 1, id="E4-k1"), pytest.param(5, 3, id="E5-k3")]
)
def test_plan_with_noise_matches_reference(num_experts, k, device):
    logits, _ = make_routing_impl(9, num_experts, k, "random", seed=k)
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)) / num_experts
    plan = route(logits.to(device), k, noise.to(device), backend=device)
    assert_plan_matches(plan, route_reference(logits, k, noise))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.float64, id="fp64"),
        pytest.param(torch.bfloat16, id="bf16"),
        pytest.param(torch.float16, id="fp16"),
    ],
)
def test_any_float_dtype_routes_in_float32(dtype, device):
    logits = torch.randn(6, 5).to(dtype)
    noise = (torch.randn(6, 5) / 5).to(dtype)
    plan = route(logits.to(device), 2, noise.to(device), backend=device)
    assert_plan_matches(plan, route_reference(logits, 2, noise))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    logits = torch.randn(0, 4, device=device, requires_grad=True)
    plan = route(logits, 2, backend=device)
    assert plan.gates.shape == (0, 2) and plan.probs.shape == (0, 4)
    assert plan.counts.tolist() == [0] * 4 and plan.offsets.tolist() == [0] * 5
    assert plan.sorted_slots.numel() == plan.inverse.numel() == 0
    (grad,) = torch.autograd.grad(plan.gates.sum(), logits)
    assert grad.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_expert_index(device):
    logits = torch.zeros(3, 4)
    logits[1, 2] = 1.0
    logits[2, 1] = logits[2, 3] = 1.0
    plan = route(logits.to(device), 3, backend=device)
    assert plan.experts.tolist() == [[0, 1, 2], [2, 0, 1], [1, 3, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logits_still_give_a_valid_plan(device):
    logits = torch.randn(6, 5)
    logits[2, 3] = math.nan
    logits[4] = math.nan
    plan = route(logits.to(device), 3, check_values=False, backend=device)
    experts = plan.experts.cpu()
    assert bool(((experts >= 0) & (experts < 5)).all())
    assert all(len(set(row)) == 3 for row in experts.tolist())
    assert sorted(plan.sorted_slots.tolist()) == list(range(18))
    assert plan.sorted_slots[plan.inverse].tolist() == list(range(18))
    assert bool(plan.probs[4].isnan().all()) and bool(plan.probs[[0, 1, 3, 5]].isfinite().all())


def test_auto_backend_runs_the_cpu_kernel():
    logits, _ = make_routing_impl(5, 4, 2)
    want = compiled.route_compiled(logits, 2)
    for got, ref in zip(route(logits, 2), want, strict=True):
        assert torch.equal(got, ref)


# --- gradients ---------------------------------------------------------------------------------


def _grads(plan_fn, logits, noise, weights):
    """d loss / d (logits, noise) of loss = gates . w_g + probs . w_p + noisy_logits . w_n."""
    leaves = [logits.detach().clone().requires_grad_(True), noise.detach().clone().requires_grad_(True)]
    plan = plan_fn(*leaves)
    loss = sum((getattr(plan, name) * w).sum() for name, w in weights.items())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    # probs do not depend on the noise: no gradient reaches it.
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "outputs",
    [
        pytest.param(("gates",), id="gates"),
        pytest.param(("probs",), id="probs"),
        pytest.param(("noisy_logits",), id="noisy"),
        pytest.param(("gates", "probs", "noisy_logits"), id="all"),
    ],
)
@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 1, id="E4-k1"), pytest.param(5, 3, id="E5-k3")]
)
def test_gradients_match_reference(num_experts, k, outputs, device):
    # Well-separated top-k (make_routing) and small noise: the choice is the same in both.
    logits, _ = make_routing_impl(6, num_experts, k, "random", seed=3)
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)) / 100
    g = torch.Generator().manual_seed(4)
    shapes = {"gates": (6, k), "probs": (6, num_experts), "noisy_logits": (6, num_experts)}
    weights = {name: torch.randn(shapes[name], generator=g) for name in outputs}
    got = _grads(
        lambda lg, nz: route(lg, k, nz, backend=device),
        logits.to(device),
        noise.to(device),
        {n: w.to(device) for n, w in weights.items()},
    )
    want = _grads(lambda lg, nz: route_reference(lg, k, nz), logits, noise, weights)
    for name, a, b in zip(("logits", "noise"), got, want, strict=True):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_dtype_follows_the_inputs(device):
    logits = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    noise = torch.randn(4, 3, device=device).to(torch.bfloat16).requires_grad_(True)
    plan = route(logits, 2, noise, backend=device)
    grad_l, grad_n = torch.autograd.grad(plan.gates.sum(), (logits, noise))
    assert grad_l.dtype == torch.float64 and grad_n.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("num_experts", "k"), [pytest.param(4, 1, id="E4-k1"), pytest.param(5, 2, id="E5-k2")]
)
def test_gradcheck(num_experts, k, device):
    # Routing runs in float32 by contract (even for float64 logits), so the finite differences
    # take a larger step and tolerance than float64's defaults; the top-k is separated by >= 1.5,
    # so the step never changes the choice.
    logits, _ = make_routing_impl(3, num_experts, k, "some_empty", seed=k)
    noise = torch.randn(logits.shape, dtype=torch.float64) / 100
    leaves = (logits.double().to(device).requires_grad_(True), noise.to(device).requires_grad_(True))

    def fn(lg, nz):
        plan = route(lg, k, nz, backend=device)
        return plan.gates, plan.probs, plan.noisy_logits

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-3, atol=2e-4, rtol=1e-3)


# --- the ops themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("with_noise", "requires_grad"),
    [
        pytest.param(False, True, id="clean-grad"),
        pytest.param(True, True, id="noisy-grad"),
        pytest.param(True, False, id="noisy"),
    ],
)
def test_opcheck(with_noise, requires_grad, device):
    logits, _ = make_routing_impl(5, 4, 2, "random", seed=6)
    logits = logits.to(device).requires_grad_(requires_grad)
    noise = (torch.randn(5, 4) / 10).to(device).requires_grad_(requires_grad) if with_noise else None
    torch.library.opcheck(torch.ops.moce.route_fwd.default, (logits, noise, 2))
    _, experts, probs, noisy, *_ = torch.ops.moce.route_fwd(logits.detach(), None, 2)
    for grads in (
        (torch.randn(5, 2), torch.randn(5, 4), torch.randn(5, 4)),
        (torch.randn(5, 2), None, None),
        (None, torch.randn(5, 4), None),
    ):
        on_device = tuple(None if g is None else g.to(device) for g in grads)
        torch.library.opcheck(torch.ops.moce.route_bwd.default, (noisy, probs, experts, *on_device))


@pytest.mark.parametrize("device", DEVICES)
def test_is_deterministic(device):
    logits = torch.randn(300, 6, device=device, requires_grad=True)
    noise = torch.randn(300, 6, device=device) / 6

    def run():
        plan = route(logits, 3, noise, backend=device)
        (grad,) = torch.autograd.grad((plan.gates * plan.gates).sum() + plan.probs[:, 0].sum(), logits)
        return (*plan, grad)

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_double_backward_raises():
    logits = torch.randn(3, 4, requires_grad=True)
    plan = route(logits, 2, backend="cpu")
    (grad,) = torch.autograd.grad(plan.gates.pow(2).sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_registration_survives_reimport():
    importlib.reload(compiled)  # would raise if the fake / autograd registrations ran twice
    logits, want = make_routing_impl(4, 3, 2)
    assert_plan_matches(compiled.route_compiled(logits, 2), want)


# --- bad input -------------------------------------------------------------------------------

FWD_BAD_INPUTS = [
    pytest.param(dict(logits=torch.randn(4)), "logits must be a 2-D", id="logits-1d"),
    pytest.param(dict(logits=torch.ones(2, 4, dtype=torch.int64)), "logits must be float32", id="logits-int"),
    pytest.param(dict(logits=torch.randn(2, 0), k=1), r"at least one expert column \(E >= 1\)", id="E0"),
    pytest.param(dict(k=0), r"k must be in 1..E = 1..4, got 0", id="k0"),
    pytest.param(dict(k=5), r"k must be in 1..E = 1..4, got 5", id="k-E+1"),
    pytest.param(
        dict(noise=torch.randn(2, 3)), r"noise must have shape \[B, E\] = \[2, 4\]", id="noise-shape"
    ),
    pytest.param(dict(noise=torch.ones(2, 4, dtype=torch.int32)), "noise must be float32", id="noise-int"),
]


@pytest.mark.parametrize(("overrides", "match"), FWD_BAD_INPUTS)
def test_fwd_op_bad_input_raises(overrides, match):
    args = dict(logits=torch.randn(2, 4), noise=None, k=2)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.route_fwd(args["logits"], args["noise"], args["k"])


def _bwd_args():
    _, experts, probs, noisy, *_ = torch.ops.moce.route_fwd(torch.randn(3, 4), None, 2)
    return dict(
        noisy=noisy,
        probs=probs,
        experts=experts,
        grad_gates=torch.randn(3, 2),
        grad_probs=None,
        grad_noisy=None,
    )


BWD_BAD_INPUTS = [
    pytest.param(dict(noisy=torch.randn(3, 4).double()), "noisy must be float32", id="noisy-fp64"),
    pytest.param(
        dict(probs=torch.randn(3, 5)), r"probs must have shape \[B, E\] = \[3, 4\]", id="probs-shape"
    ),
    pytest.param(
        dict(experts=torch.zeros(3, 2, dtype=torch.int32)), "experts must be int64", id="experts-int32"
    ),
    pytest.param(
        dict(experts=torch.zeros(2, 2, dtype=torch.int64)), r"experts must have shape \[B, k\]", id="exp-B"
    ),
    pytest.param(
        dict(grad_gates=torch.randn(3, 3)), r"grad_gates must have shape \[B, k\] = \[3, 2\]", id="gg"
    ),
    pytest.param(dict(grad_probs=torch.randn(3, 3)), r"grad_probs must have shape \[B, E\]", id="grad-probs"),
    pytest.param(
        dict(grad_noisy=torch.ones(3, 4, dtype=torch.int64)),
        "grad_noisy must be float32",
        id="grad-noisy-int",
    ),
]


@pytest.mark.parametrize(("overrides", "match"), BWD_BAD_INPUTS)
def test_bwd_op_bad_input_raises(overrides, match):
    args = _bwd_args()
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.route_bwd(*args.values())


def test_bwd_ignores_expert_indices_out_of_range():
    # Never produced by route_fwd; must not index out of bounds either (they add nothing).
    args = _bwd_args()
    args["experts"] = torch.tensor([[0, 9], [-3, 1], [2, 1 << 40]])
    grad_noisy, grad_logits = torch.ops.moce.route_bwd(*args.values())
    assert bool(grad_noisy.isfinite().all()) and bool(grad_logits.isfinite().all())


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=NEEDS_CUDA)])
def test_cuda_too_many_experts_raises(device):
    with pytest.raises(RuntimeError, match="at most 256 experts"):
        torch.ops.moce.route_fwd(torch.randn(2, 257, device=device), None, 2)
