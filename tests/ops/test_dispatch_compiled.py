"""dispatch on the compiled kernels (moce_kernels._C): C++ on the CPU, CUDA on the GPU.

Forward (bit-exact) and the gradient against ``dispatch_reference``, the ops themselves through
``torch.ops.moce.dispatch_fwd`` / ``_bwd`` (``opcheck``, bad input, out-of-range indices),
gradcheck, determinism. Kernel-allocated buffers are NaN-filled by torch (deterministic mode's
``fill_uninitialized_memory``), so an element a kernel forgets to write fails the checks.
Skipped as a whole when the extension is not built.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from moce_kernels import dispatch, route
from moce_kernels.dispatch.reference import dispatch_reference
from tests.ops._helpers import DEVICES, FEATURES, NEEDS_CUDA, ROUTINGS, plan_on, skip_unless_extension_built

skip_unless_extension_built()

from moce_kernels.dispatch import compiled  # noqa: E402  (needs the extension)

#: The shared routings and a single expert.
ROUTINGS = [*ROUTINGS, pytest.param(3, 1, 1, "random", id="B3-E1-k1")]

DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-6, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
    # The gradient sums k rows in float32 and rounds once.
    pytest.param(torch.bfloat16, 1.6e-2, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]


def check_against_reference(x, plan, atol, rtol, device):
    x_op = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().cpu().clone().requires_grad_(True)
    out = dispatch(x_op, plan, backend=device)
    cpu_plan = type(plan)(*(t.cpu() for t in plan))
    want = dispatch_reference(x_ref, cpu_plan)
    assert out.dtype == x.dtype and out.shape == want.shape and out.device == x.device
    torch.testing.assert_close(out.cpu(), want, atol=0, rtol=0)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    (got,) = torch.autograd.grad(out, x_op, grad_out.to(device))
    (ref,) = torch.autograd.grad(want, x_ref, grad_out)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert bool(got.isfinite().all()), "grad x has NaN/Inf (an element left unwritten?)"
    # Against the float64 sum of the same rows: one rounding of a float32 sum.
    exact = torch.autograd.grad(dispatch_reference(x_ref.double(), cpu_plan), x_ref, grad_out.double())[0]
    torch.testing.assert_close(got.cpu().double(), exact.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got.cpu().double(), ref.double(), atol=atol, rtol=rtol)


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize(("batch", "num_experts", "k", "pattern"), ROUTINGS)
def test_matches_reference(batch, num_experts, k, pattern, features, device):
    plan = plan_on(batch, num_experts, k, pattern, device, seed=batch * 10 + k)
    x = torch.randn(batch, *features).to(device)
    check_against_reference(x, plan, 1e-6, 1e-6, device)


@pytest.mark.usefixtures("nan_filled_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_dtypes(dtype, atol, rtol, device):
    plan = plan_on(4, 5, 3, "random", device, seed=7)
    check_against_reference(torch.randn(4, 6, 7, 3).to(dtype).to(device), plan, atol, rtol, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.int64, id="int64"),
        pytest.param(torch.int8, id="int8"),
        pytest.param(torch.bool, id="bool"),
        pytest.param(torch.complex64, id="complex64"),
    ],
)
def test_forward_moves_any_dtype_exactly(dtype, device):
    plan = plan_on(4, 4, 2, "some_empty", device, seed=2)
    x = (torch.randn(4, 3, 5) * 50).to(dtype).to(device)
    got = dispatch(x, plan, backend=device)
    assert torch.equal(got.cpu(), x.cpu().index_select(0, plan.sorted_images.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layout",
    [pytest.param("channels_last", id="channels-last"), pytest.param("sliced", id="sliced")],
)
def test_non_contiguous_input(layout, device):
    plan = plan_on(3, 4, 2, "random", device, seed=1)
    x = torch.randn(3, 4, 5, 6, device=device)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x[..., ::2]
    check_against_reference(x, plan, 1e-6, 1e-6, device)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    plan = route(torch.randn(0, 4, device=device), 2, backend="reference")
    x = torch.randn(0, 3, 5, 5, device=device, requires_grad=True)
    out = dispatch(x, plan, backend=device)
    assert out.shape == (0, 3, 5, 5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == (0, 3, 5, 5)


def test_auto_backend_runs_the_cpu_kernel():
    plan = plan_on(3, 4, 2, "random", "cpu")
    x = torch.randn(3, 5)
    assert torch.equal(dispatch(x, plan), compiled.dispatch_compiled(x, plan))


# --- the ops themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("batch", "num_experts", "k", "pattern"),
    [pytest.param(3, 4, 2, "random", id="B3-E4-k2"), pytest.param(2, 3, 3, "one_expert", id="B2-E3-k3")],
)
def test_gradcheck(batch, num_experts, k, pattern, device):
    plan = plan_on(batch, num_experts, k, pattern, device, seed=5)
    x = torch.randn(batch, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dispatch(t, plan, backend=device), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "requires_grad"),
    [
        pytest.param(torch.float32, True, id="fp32-grad"),
        pytest.param(torch.float64, True, id="fp64-grad"),
        pytest.param(torch.bfloat16, False, id="bf16"),
        pytest.param(torch.int32, False, id="int32"),
    ],
)
def test_opcheck(dtype, requires_grad, device):
    plan = plan_on(4, 3, 2, "random", device, seed=3)
    x = torch.randn(4, 3, 5).to(dtype).to(device).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.moce.dispatch_fwd.default, (x, plan.sorted_images, plan.inverse))
    if dtype.is_floating_point:
        grad_out = torch.randn(8, 3, 5, device=device).to(dtype)
        torch.library.opcheck(torch.ops.moce.dispatch_bwd.default, (grad_out, plan.inverse, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_backward_is_deterministic(dtype, device):
    plan = plan_on(16, 4, 3, "random", device, seed=4)
    x = torch.randn(16, 8, 17, 19).to(dtype).to(device)
    grad_out = torch.randn(48, 8, 17, 19).to(dtype).to(device)

    def grad():
        leaf = x.clone().requires_grad_(True)
        return torch.autograd.grad(dispatch(leaf, plan, backend=device), leaf, grad_out)[0]

    assert torch.equal(grad(), grad())


def test_double_backward_raises():
    plan = plan_on(2, 3, 2, "random", "cpu")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = dispatch(x, plan, backend="cpu")
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    importlib.reload(compiled)  # would raise if the fake / autograd registrations ran twice
    plan = plan_on(2, 3, 2, "random", "cpu")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: compiled.dispatch_compiled(t, plan), (x,))


# --- bad input -------------------------------------------------------------------------------

IDX = torch.tensor([0, 1, 2, 1, 0, 2])  # a valid sorted_images / inverse for B = 3, k = 2

FWD_BAD_INPUTS = [
    pytest.param(dict(x=torch.tensor(1.0)), "x must be a \\[B, ...\\] tensor", id="x-0d"),
    pytest.param(dict(x=torch.randn(4, 2)), "multiple of the batch size B = 4", id="S-not-multiple-of-B"),
    pytest.param(dict(sorted_images=IDX.int()), "sorted_images must be int64", id="index-int32"),
    pytest.param(dict(sorted_images=IDX.view(2, 3)), "sorted_images must be a 1-D", id="index-2d"),
    pytest.param(dict(inverse=IDX[:5]), r"inverse must have shape \[S\] = \[6\]", id="inverse-length"),
    pytest.param(
        dict(sorted_images=torch.tensor([0, 1, 3, 1, 0, 2])),
        r"sorted_images\[2\] = 3 is out of range",
        id="oob",
    ),
    pytest.param(
        dict(sorted_images=torch.tensor([0, 1, 2, -1, 0, 2])),
        r"sorted_images\[3\] = -1 is out",
        id="negative",
    ),
]


@pytest.mark.parametrize(("overrides", "match"), FWD_BAD_INPUTS)
def test_fwd_op_bad_input_raises(overrides, match):
    args = dict(x=torch.randn(3, 2), sorted_images=IDX, inverse=IDX)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.dispatch_fwd(args["x"], args["sorted_images"], args["inverse"])


BWD_BAD_INPUTS = [
    pytest.param(
        dict(grad_out=torch.ones(6, 2, dtype=torch.int64)), "grad_out must be float32", id="int-grad"
    ),
    pytest.param(dict(batch=4), "multiple of the batch size B = 4", id="batch-mismatch"),
    pytest.param(dict(batch=-1), "batch must be >= 0", id="batch-negative"),
    pytest.param(
        dict(inverse=torch.tensor([0, 1, 2, 3, 4, 6])), r"inverse\[5\] = 6 is out of range", id="oob"
    ),
]


@pytest.mark.parametrize(("overrides", "match"), BWD_BAD_INPUTS)
def test_bwd_op_bad_input_raises(overrides, match):
    args = dict(grad_out=torch.randn(6, 2), inverse=IDX, batch=3)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moce.dispatch_bwd(args["grad_out"], args["inverse"], args["batch"])


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=NEEDS_CUDA)])
def test_cuda_out_of_range_index_gives_nan_not_a_crash(device):
    # The CUDA op cannot check indices without a host sync: bad rows come out NaN, nothing is
    # read out of bounds.
    x = torch.randn(3, 5, device=device)
    index = torch.tensor([0, 1, 99, -1, 0, 2], device=device)
    out = torch.ops.moce.dispatch_fwd(x, index, index)
    grad = torch.ops.moce.dispatch_bwd(
        torch.randn(6, 5, device=device), torch.tensor([0, 1, 2, 3, 4, 1 << 40], device=device), 3
    )
    torch.cuda.synchronize()
    assert bool(out[2:4].isnan().all()) and torch.equal(out[[0, 1, 4, 5]], x[[0, 1, 0, 2]])
    assert bool(grad[2].isnan().all()) and bool(grad[:2].isfinite().all())
