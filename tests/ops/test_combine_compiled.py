"""combine on the compiled kernels (moce_kernels._C): C++ on the CPU, CUDA on the GPU.

Forward and both gradients (y, gates) against ``combine_reference`` (run in float64 on the same
rounded inputs), the ops themselves through ``torch.ops.moce.combine_fwd`` / ``_bwd``
(``opcheck``, bad input, out-of-range indices), gradcheck, determinism. Kernel-allocated buffers
are NaN-filled by torch (deterministic mode's ``fill_uninitialized_memory``), so an element a
kernel forgets to write fails the checks. Skipped as a whole when the extension is not built.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from moce_kernels import combine, route
from moce_kernels.combine.reference import combine_reference
from tests.ops._helpers import DEVICES, FEATURES, NEEDS_CUDA, ROUTINGS, plan_on, skip_unless_extension_built

skip_unless_extension_built()

from moce_kernels.combine import compiled  # noqa: E402  (needs the extension)

DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
    # One rounding of the float32 result to bf16 / fp16.
    pytest.param(torch.bfloat16, 1.6e-2, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]


def check_against_reference(y, plan, gates, atol, rtol, device):
    """Output, grad y and grad gates of the compiled op against the float64 reference."""
    y_op = y.detach().clone().requires_grad_(True)
    g_op = gates.detach().clone().requires_grad_(True)
    out = combine(y_op, plan, g_op, backend=device)
    assert out.dtype == y.dtype and out.device == y.device
    assert bool(out.isfinite().all()), "output has NaN/Inf (an element left unwritten?)"
    cpu_plan = type(plan)(*(t.cpu() for t in plan))
    y_ref = y.detach().cpu().double().requires_grad_(True)
    g_ref = gates.detach().cpu().double().requires_grad_(True)
    want = combine_reference(y_ref, cpu_plan, g_ref)
    torch.testing.assert_close(out.cpu().double(), want.detach(), atol=atol, rtol=rtol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    grad_y, grad_g = torch.autograd.grad(out, (y_op, g_op), grad_out.to(device))
    want_y, want_g = torch.autograd.grad(want, (y_ref, g_ref), grad_out.double())
    assert grad_y.dtype == y.dtype and grad_g.dtype == gates.dtype
    assert bool(grad_y.isfinite().all()) and bool(grad_g.isfinite().all())
    torch.testing.assert_close(grad_y.cpu().double(), want_y, atol=atol, rtol=rtol)
    # The gate gradient sums a row of F products: atol grows with sqrt(F).
    root_f = math.sqrt(max(1, y[0].numel()))
    g_atol = max(atol, 1e-6 if gates.dtype == torch.float32 else 0.0) * root_f
    torch.testing.assert_close(grad_g.cpu().double(), want_g, atol=g_atol, rtol=max(rtol, 1e-5))


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize(("batch", "num_experts", "k", "pattern"), ROUTINGS)
def test_matches_reference(batch, num_experts, k, pattern, features, device):
    plan = plan_on(batch, num_experts, k, pattern, device, seed=batch * 10 + k)
    y = torch.randn(batch * k, *features).to(device)
    check_against_reference(y, plan, plan.gates, 1e-6, 1e-5, device)


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(
    "gates_dtype",
    [pytest.param(torch.float32, id="gates-fp32"), pytest.param(None, id="gates-like-y")],
)
def test_dtypes(dtype, atol, rtol, gates_dtype, device):
    plan = plan_on(4, 5, 3, "random", device, seed=7)
    gates = plan.gates.to(gates_dtype or dtype)
    check_against_reference(torch.randn(12, 6, 7, 3).to(dtype).to(device), plan, gates, atol, rtol, device)


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
def test_float64_gates_accumulate_in_float64(device):
    # float32 y with float64 gates: float64 accumulation, like the reference.
    plan = plan_on(3, 4, 2, "random", device, seed=2)
    gates = torch.rand(3, 2, dtype=torch.float64, device=device)
    check_against_reference(torch.randn(6, 40).to(device), plan, gates, 1e-6, 1e-6, device)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    plan = plan_on(3, 4, 2, "random", device, seed=1)
    y = torch.randn(6, 4, 5, 6, device=device).to(memory_format=torch.channels_last)
    check_against_reference(y, plan, plan.gates, 1e-6, 1e-5, device)
    check_against_reference(y[..., ::2], plan, plan.gates, 1e-6, 1e-5, device)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    plan = route(torch.randn(0, 4, device=device), 2, backend="reference")
    y = torch.randn(0, 3, 5, device=device, requires_grad=True)
    gates = torch.zeros(0, 2, device=device, requires_grad=True)
    out = combine(y, plan, gates, backend=device)
    assert out.shape == (0, 3, 5)
    grad_y, grad_g = torch.autograd.grad(out.sum(), (y, gates))
    assert grad_y.shape == (0, 3, 5) and grad_g.shape == (0, 2)


def test_auto_backend_runs_the_cpu_kernel():
    plan = plan_on(3, 4, 2, "random", "cpu")
    y = torch.randn(6, 5)
    assert torch.equal(combine(y, plan), compiled.combine_compiled(y, plan))


# --- the ops themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("batch", "num_experts", "k", "pattern"),
    [pytest.param(3, 4, 2, "random", id="B3-E4-k2"), pytest.param(2, 3, 3, "one_expert", id="B2-E3-k3")],
)
def test_gradcheck(batch, num_experts, k, pattern, device):
    plan = plan_on(batch, num_experts, k, pattern, device, seed=5)
    y = torch.randn(batch * k, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    gates = plan.gates.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, g: combine(a, plan, g, backend=device), (y, gates))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "requires_grad"),
    [
        pytest.param(torch.float32, True, id="fp32-grad"),
        pytest.param(torch.float64, True, id="fp64-grad"),
        pytest.param(torch.bfloat16, False, id="bf16"),
    ],
)
def test_opcheck(dtype, requires_grad, device):
    plan = plan_on(4, 3, 2, "random", device, seed=3)
    y = torch.randn(8, 3, 5).to(dtype).to(device).requires_grad_(requires_grad)
    gates = plan.gates.to(dtype).requires_grad_(requires_grad)
    args = (y, gates, plan.inverse, plan.sorted_slots)
    torch.library.opcheck(torch.ops.moce.combine_fwd.default, args)
    grad_out = torch.randn(4, 3, 5, device=device).to(dtype)
    torch.library.opcheck(
        torch.ops.moce.combine_bwd.default,
        (grad_out, y.detach(), gates.detach(), plan.inverse, plan.sorted_slots),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_backward_is_deterministic(dtype, device):
    plan = plan_on(16, 4, 3, "random", device, seed=4)
    y = torch.randn(48, 8, 17, 19).to(dtype).to(device)
    grad_out = torch.randn(16, 8, 17, 19).to(dtype).to(device)

    def grads():
        leaves = (y.clone().requires_grad_(True), plan.gates.clone().requires_grad_(True))
        return torch.autograd.grad(combine(*leaves[:1], plan, leaves[1], backend=device), leaves, grad_out)

    for a, b in zip(grads(), grads(), strict=True):
        assert torch.equal(a, b)


def test_double_backward_raises():
    plan = plan_on(2, 3, 2, "random", "cpu")
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = combine(y, plan, backend="cpu")
    (grad_y,) = torch.autograd.grad(out.pow(2).sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_y.sum().backward()


def test_registration_survives_reimport():
    importlib.reload(compiled)  # would raise if the fake / autograd registrations ran twice
    plan = plan_on(2, 3, 2, "random", "cpu")
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    gates = plan.gates.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, g: compiled.combine_compiled(a, plan, g), (y, gates))


# --- bad input -------------------------------------------------------------------------------

IDX = torch.tensor([0, 1, 2, 3, 4, 5])  # a valid inverse / sorted_slots for B = 3, k = 2


def _fwd_args():
    return dict(y=torch.randn(6, 2), gates=torch.rand(3, 2), inverse=IDX, sorted_slots=IDX)


FWD_BAD_INPUTS = [
    pytest.param(dict(y=torch.ones(6, 2, dtype=torch.int64)), "y must be float32", id="y-int"),
    pytest.param(dict(y=torch.tensor(1.0)), "y must be a \\[S, ...\\] tensor", id="y-0d"),
    pytest.param(
        dict(gates=torch.rand(2, 2)), r"gates must have shape \[B, k\] with B \* k = S = 6", id="gates-B"
    ),
    pytest.param(dict(gates=torch.rand(6)), r"gates must have shape \[B, k\]", id="gates-1d"),
    pytest.param(dict(gates=torch.ones(3, 2, dtype=torch.int64)), "gates must be float32", id="gates-int"),
    pytest.param(dict(inverse=IDX[:5]), r"inverse must have shape \[S\] = \[6\]", id="inverse-length"),
    pytest.param(dict(sorted_slots=IDX.int()), "sorted_slots must be int64", id="slots-int32"),
    pytest.param(
        dict(inverse=torch.tensor([0, 1, 2, 3, 4, 6])), r"inverse\[5\] = 6 is out of range", id="oob"
    ),
]


@pytest.mark.parametrize(("overrides", "match"), FWD_BAD_INPUTS)
def test_fwd_op_bad_input_raises(overrides, match):
    args = _fwd_args()
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.combine_fwd(*args.values())


BWD_BAD_INPUTS = [
    pytest.param(dict(grad_out=torch.randn(3, 3)), r"grad_out must have shape \[3, 2\]", id="grad-shape"),
    pytest.param(
        dict(grad_out=torch.randn(3, 2).double()), "grad_out must have the dtype of y", id="grad-dtype"
    ),
    pytest.param(
        dict(sorted_slots=torch.tensor([0, -1, 2, 3, 4, 5])),
        r"sorted_slots\[1\] = -1 is out of range",
        id="oob",
    ),
]


@pytest.mark.parametrize(("overrides", "match"), BWD_BAD_INPUTS)
def test_bwd_op_bad_input_raises(overrides, match):
    args = dict(grad_out=torch.randn(3, 2), **_fwd_args())
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.combine_bwd(*args.values())


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=NEEDS_CUDA)])
def test_cuda_out_of_range_index_gives_nan_not_a_crash(device):
    # The CUDA op cannot check indices without a host sync: what needs a bad index comes out NaN.
    y, gates = torch.randn(6, 5, device=device), torch.rand(3, 2, device=device)
    inverse = torch.tensor([0, 1, 2, 3, 4, 99], device=device)
    slots = torch.tensor([0, 1, -5, 3, 4, 5], device=device)
    out = torch.ops.moce.combine_fwd(y, gates, inverse, slots)
    grad_y, grad_g = torch.ops.moce.combine_bwd(torch.ones(3, 5, device=device), y, gates, inverse, slots)
    torch.cuda.synchronize()
    assert bool(out[2].isnan().all()) and bool(out[:2].isfinite().all())
    assert bool(grad_y[2].isnan().all()) and bool(grad_y[[0, 1, 3, 4, 5]].isfinite().all())
    assert bool(grad_g[2, 1].isnan()) and bool(grad_g.flatten()[:5].isfinite().all())
