"""Shared fixtures for the moce_kernels tests: seeding and routing plans with forced patterns.

Helpers are handed out as session-scoped fixtures that return plain functions, so that
hypothesis tests (which must not use function-scoped fixtures) can use them too.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter. Triton reads this when
# it is imported, so it is set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# A bounded example budget keeps CI fast; `pytest --hypothesis-profile=thorough` runs longer.
settings.register_profile("ci", max_examples=20, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile("ci")

from moce_kernels import RoutingPlan, route  # noqa: E402
from moce_kernels._backend import triton_usable  # noqa: E402

#: Marks a test that runs the Triton kernels on CPU tensors: it needs the interpreter, set above
#: where there is no GPU. On a GPU machine it skips (compiled kernels take CUDA tensors only);
#: the GPU side of each such test is in the *_gpu.py files and the op tests' TRITON_DEVICE.
needs_triton_on_cpu = pytest.mark.skipif(
    not triton_usable("cpu")[0], reason=f"Triton on CPU tensors: {triton_usable('cpu')[1]}"
)

#: Routing patterns ``make_routing`` can force.
#: - "random": Gaussian logits, every image picks its own experts.
#: - "one_expert": every image picks the same experts, in the same order, starting from the last
#:   one (so with k = 1 all rows land on expert E - 1 and experts 0..E-2 are empty).
#: - "some_empty": images pick only from a random pool of max(k, E // 2) experts (at most E - 1
#:   when k < E), so at least one expert gets no rows whenever k < E.
ROUTING_PATTERNS = ("random", "one_expert", "some_empty")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


def choose_experts(
    batch: int, num_experts: int, k: int, pattern: str, generator: torch.Generator
) -> list[list[int]]:
    """Per image, k distinct experts in the order the router must pick them (see ROUTING_PATTERNS)."""
    if pattern not in ROUTING_PATTERNS:
        raise ValueError(f"unknown routing pattern {pattern!r}")
    if pattern == "one_expert":
        same = list(range(num_experts - 1, num_experts - 1 - k, -1))
        return [list(same) for _ in range(batch)]
    if pattern == "some_empty":
        size = max(k, num_experts // 2)
        if k < num_experts:
            size = min(size, num_experts - 1)
        pool = torch.randperm(num_experts, generator=generator)[:size].tolist()
    else:
        pool = list(range(num_experts))
    choices = []
    for _ in range(batch):
        order = torch.randperm(len(pool), generator=generator)[:k].tolist()
        choices.append([pool[i] for i in order])
    return choices


def logits_for_choices(
    choices: list[list[int]], num_experts: int, generator: torch.Generator, margin: float = 2.0
) -> torch.Tensor:
    """[B, E] float32 logits whose descending top-k per image is exactly ``choices[b]``.

    Unchosen experts get values in [-1, 0); choice j gets ``margin * (k - j)`` plus a jitter
    in [0, margin / 4), so the top-k is separated from the rest (and within itself) by at least
    ``0.75 * margin``: small perturbations (gradcheck, float rounding) never change it.
    """
    batch = len(choices)
    logits = -torch.rand(batch, num_experts, generator=generator)
    for b, chosen in enumerate(choices):
        k = len(chosen)
        for j, e in enumerate(chosen):
            logits[b, e] = margin * (k - j) + margin / 4 * float(torch.rand((), generator=generator))
    return logits


def make_routing_impl(
    batch: int,
    num_experts: int,
    k: int,
    pattern: str = "random",
    *,
    seed: int = 0,
    noise: bool = False,
) -> tuple[torch.Tensor, RoutingPlan]:
    """Logits [B, E] float32 and their plan ``route(logits, k[, noise])`` for a forced pattern.

    With ``noise=True`` (only for pattern "random") Gaussian noise of std 1 / E is added.
    """
    generator = torch.Generator().manual_seed(seed)
    if pattern == "random":
        logits = torch.randn(batch, num_experts, generator=generator)
        noise_t = torch.randn(batch, num_experts, generator=generator) / num_experts if noise else None
        return logits, route(logits, k, noise_t)
    if noise:
        raise ValueError("noise would break a forced pattern; use pattern='random'")
    choices = choose_experts(batch, num_experts, k, pattern, generator)
    logits = logits_for_choices(choices, num_experts, generator)
    plan = route(logits, k)
    # The helper itself must do what it says, or every test built on it tests nothing.
    assert plan.experts.tolist() == choices
    return logits, plan


def expert_order_impl(experts: list[list[int]], num_experts: int) -> list[int]:
    """Slots ``b * k + j`` sorted by expert, then image, then choice (pure Python)."""
    k = len(experts[0]) if experts else 0
    order = []
    for e in range(num_experts):
        for b, chosen in enumerate(experts):
            for j in range(k):
                if chosen[j] == e:
                    order.append(b * k + j)
    return order


@pytest.fixture(scope="session")
def make_routing() -> Callable[..., tuple[torch.Tensor, RoutingPlan]]:
    """``make_routing(B, E, k, pattern="random", *, seed=0, noise=False) -> (logits, plan)``."""
    return make_routing_impl


@pytest.fixture(scope="session")
def expert_order() -> Callable[[list[list[int]], int], list[int]]:
    """``expert_order(experts_list, E) -> sorted slot ids``, computed independently of route."""
    return expert_order_impl


def fast_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """The non-reference backends of ``op`` that can run on ``device`` here (for parametrizing)."""
    from moce_kernels import _backend  # noqa: PLC0415

    device = torch.device(device)
    usable = []
    for backend in sorted(_backend.implemented(op)):
        if backend in ("cpu", "cuda") and backend != device.type:
            continue
        try:
            _backend.resolve_backend(op, backend, device)
        except RuntimeError:
            continue
        usable.append(backend)
    return usable


@pytest.fixture(autouse=True, scope="session")
def _one_dimensional_triton_grids():
    """Every Triton launch of moce_kernels in the run must use a 1-d grid (tests/_launch_grids.py)."""
    from tests._launch_grids import one_dimensional_grids  # noqa: PLC0415

    with one_dimensional_grids():
        yield
