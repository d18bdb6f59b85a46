"""dispatch on the Triton kernels (moce_kernels/dispatch/triton.py) against dispatch_reference.

Forward bit-exact, the gradient of x (sum of each image's k rows), every routing pattern and
(E, k), dtypes (float, integer, bool, complex), layouts, several feature chunks, corrupted plans
(no out-of-bounds access), NaN-prefilled buffers, determinism, gradcheck, opcheck, torch.compile
and an ahead-of-time sm_90 compile. Without a GPU the kernels run through the Triton
interpreter on the CPU (tests/conftest.py); with one, on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from moce_kernels import _backend, dispatch, route
from moce_kernels.dispatch.reference import dispatch_reference
from moce_kernels.route.reference import RoutingPlan
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

from moce_kernels.dispatch import triton as dispatch_triton_module  # noqa: E402  (needs triton)
from moce_kernels.dispatch.triton import dispatch_triton  # noqa: E402

#: (dtype, atol, rtol) of the gradient (a sum of k rows, float32 accumulation rounded once;
#: the reference sums in its own order). The forward is a copy: always bit-exact.
FLOAT_DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-6, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
    pytest.param(torch.bfloat16, 2e-2, 1.6e-2, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]


def check_against_reference(x: torch.Tensor, plan: RoutingPlan, atol: float = 1e-6, rtol: float = 1e-6):
    """Forward bit-exact and dtype/shape-equal; x's gradient close; returns the output."""
    x_op = x.detach().clone().requires_grad_(x.dtype.is_floating_point)
    x_ref = x.detach().clone().requires_grad_(x.dtype.is_floating_point)
    out = dispatch_triton(x_op, plan)
    want = dispatch_reference(x_ref, plan)
    assert out.dtype == want.dtype and out.shape == want.shape
    torch.testing.assert_close(out, want, atol=0, rtol=0, equal_nan=True)
    if x.dtype.is_floating_point:
        grad_out = torch.randn(out.shape, device=x.device).to(x.dtype)
        (got,) = torch.autograd.grad(out, x_op, grad_out)
        (ref,) = torch.autograd.grad(want, x_ref, grad_out)
        assert got.dtype == x.dtype and got.shape == x.shape
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    return out


# --- against the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("num_experts", "k"), EK_CASES)
@pytest.mark.parametrize("batch", [pytest.param(1, id="B1"), pytest.param(5, id="B5")])
def test_matches_reference(make_routing, pattern, num_experts, k, batch):
    _, plan = make_routing(batch, num_experts, k, pattern, seed=batch * 100 + num_experts * 10 + k)
    # 3 x 13 x 21 = 819 features: not a multiple of the block size.
    check_against_reference(torch.randn(batch, 3, 13, 21, device=DEVICE), plan_on_device(plan))


def test_public_function_backend_triton(make_routing):
    _, plan = make_routing(4, 5, 2, "some_empty", seed=2)
    plan = plan_on_device(plan)
    x = torch.randn(4, 2, 3, 5, device=DEVICE)
    torch.testing.assert_close(
        dispatch(x, plan, backend="triton"), dispatch_reference(x, plan), atol=0, rtol=0
    )


def test_all_images_on_one_expert(make_routing):
    _, plan = make_routing(6, 4, 1, "one_expert")
    assert plan.counts.tolist() == [0, 0, 0, 6]
    x = torch.randn(6, 2, 5, 5, device=DEVICE)
    torch.testing.assert_close(check_against_reference(x, plan_on_device(plan)), x, atol=0, rtol=0)


def test_empty_batch():
    plan = route(torch.randn(0, 4), 2)
    x = torch.randn(0, 3, 4, device=DEVICE, requires_grad=True)
    out = dispatch_triton(x, plan_on_device(plan))
    assert out.shape == (0, 3, 4)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == (0, 3, 4)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), FLOAT_DTYPES)
def test_float_dtypes(make_routing, dtype, atol, rtol):
    _, plan = make_routing(4, 5, 3, "random", seed=7)
    x = torch.randn(4, 6, 7, 3).to(dtype).to(DEVICE)
    check_against_reference(x, plan_on_device(plan), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.int32, id="int32"),
        pytest.param(torch.int64, id="int64"),
        pytest.param(torch.uint8, id="uint8"),
        pytest.param(torch.bool, id="bool"),
        pytest.param(torch.complex64, id="complex64"),
    ],
)
def test_other_dtypes_copy_exactly(make_routing, dtype):
    _, plan = make_routing(4, 4, 2, "random", seed=8)
    x = torch.randn(4, 3, 5, dtype=torch.complex64) if dtype.is_complex else torch.randint(0, 100, (4, 3, 5))
    check_against_reference(x.to(dtype).to(DEVICE), plan_on_device(plan))


@pytest.mark.parametrize(
    "feature_shape",
    [pytest.param((), id="1d"), pytest.param((7,), id="2d"), pytest.param((2, 1, 1), id="4d-1x1")],
)
def test_any_rank(make_routing, feature_shape):
    _, plan = make_routing(3, 4, 2, "some_empty", seed=1)
    check_against_reference(torch.randn(3, *feature_shape, device=DEVICE), plan_on_device(plan))


def test_channels_last_kept(make_routing):
    _, plan = make_routing(3, 4, 2, "random", seed=3)
    x = torch.randn(3, 5, 4, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    out = check_against_reference(x, plan_on_device(plan))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_strided_input(make_routing):
    _, plan = make_routing(3, 4, 2, "random", seed=4)
    wide = torch.randn(3, 4, 10, device=DEVICE)
    check_against_reference(wide[..., ::2], plan_on_device(plan))


def test_several_feature_chunks(make_routing, monkeypatch):
    # Small blocks so that a row spans many programs (the GPU sizes would need big tensors here).
    monkeypatch.setattr(dispatch_triton_module, "row_block", lambda features: (16, 1))
    _, plan = make_routing(3, 4, 2, "random", seed=5)
    check_against_reference(torch.randn(3, 5, 7, 3, device=DEVICE), plan_on_device(plan))


# --- robustness -----------------------------------------------------------------------------------


def test_buffers_fully_written(make_routing, monkeypatch):
    _, plan = make_routing(5, 4, 3, "some_empty", seed=6)
    plan = plan_on_device(plan)
    x = torch.randn(5, 3, 13, 21, device=DEVICE, requires_grad=True)
    with prefilled_buffers(monkeypatch):
        out = dispatch_triton(x, plan)
        (grad,) = torch.autograd.grad(out, x, torch.randn(out.shape, device=DEVICE))
    assert_all_written(out, "output")
    assert_all_written(grad, "grad x")
    torch.testing.assert_close(out, dispatch_reference(x, plan), atol=0, rtol=0)


def test_corrupted_plan_is_never_dereferenced_out_of_bounds(make_routing):
    # Out-of-range indices (a plan for another batch, memory corruption): no illegal access, the
    # rows they name come out NaN (floats) / 0 (integers), every other row is right.
    _, plan = make_routing(3, 4, 2, "random", seed=9)
    plan = plan_on_device(plan)
    bad_images = plan.sorted_images.clone()
    bad_images[1], bad_images[4] = 3, -7
    bad_inverse = plan.inverse.clone()
    bad_inverse[2] = 1 << 40  # slot 2 = image 1, choice 0
    bad = plan._replace(sorted_images=bad_images, inverse=bad_inverse)
    x = torch.randn(3, 2, 5, device=DEVICE, requires_grad=True)
    out = dispatch_triton(x, bad)
    want = dispatch_reference(x, plan)
    good = [i for i in range(6) if i not in (1, 4)]
    torch.testing.assert_close(out[good], want[good], atol=0, rtol=0)
    assert bool(out[[1, 4]].isnan().all())
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert bool(grad[1].isnan().all()) and not bool(grad[[0, 2]].isnan().any())
    ints = dispatch_triton(torch.arange(3, device=DEVICE), bad)
    assert ints[[1, 4]].tolist() == [0, 0]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        pytest.param(
            "sorted_images", torch.zeros(5, dtype=torch.int64), ValueError, id="short-sorted_images"
        ),
        pytest.param("inverse", torch.zeros(7, dtype=torch.int64), ValueError, id="long-inverse"),
        pytest.param("sorted_images", torch.zeros(6), TypeError, id="float-sorted_images"),
    ],
)
def test_malformed_plan_raises(make_routing, field, value, error):
    _, plan = make_routing(3, 4, 2, "random", seed=10)
    bad = plan_on_device(plan)._replace(**{field: value.to(DEVICE)})
    with pytest.raises(error, match=f"plan.{field}"):
        dispatch_triton(torch.randn(3, 2, device=DEVICE), bad)


def test_backward_is_deterministic(make_routing):
    _, plan = make_routing(6, 5, 3, "random", seed=11)
    plan = plan_on_device(plan)
    x = torch.randn(6, 3, 9, 11, device=DEVICE, requires_grad=True)
    out = dispatch_triton(x, plan)
    grad_out = torch.randn(out.shape, device=DEVICE)
    first = torch.autograd.grad(out, x, grad_out, retain_graph=True)[0]
    for _ in range(2):
        assert torch.equal(torch.autograd.grad(out, x, grad_out, retain_graph=True)[0], first)


def test_gradcheck(make_routing):
    _, plan = make_routing(3, 4, 2, "some_empty", seed=12)
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dispatch_triton(t, plan_on_device(plan)), (x,))


def test_double_backward_raises(make_routing):
    _, plan = make_routing(3, 4, 2, "random", seed=13)
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    out = dispatch_triton(x, plan_on_device(plan))
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out).requires_grad_(True), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# --- torch.library ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_opcheck(make_routing, dtype):
    _, plan = make_routing(4, 5, 2, "random", seed=14)
    plan = plan_on_device(plan)
    x = torch.randn(4, 12, device=DEVICE).to(dtype).requires_grad_(True)
    torch.library.opcheck(torch.ops.moce_triton.dispatch_fwd.default, (x, plan.sorted_images, plan.inverse))
    grad_out = torch.randn(8, 12, device=DEVICE).to(dtype)
    torch.library.opcheck(torch.ops.moce_triton.dispatch_bwd.default, (grad_out, plan.inverse, 4))


def test_torch_compile(make_routing):
    _, plan = make_routing(4, 5, 2, "random", seed=15)
    plan = plan_on_device(plan)
    x = torch.randn(4, 3, 5, 2, device=DEVICE, requires_grad=True)
    weights = torch.randn(8, 3, 5, 2, device=DEVICE)

    def step(t):
        return (dispatch_triton(t, plan) * weights).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (got,) = torch.autograd.grad(compiled(x), x)
    (want,) = torch.autograd.grad(step(x), x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- ahead-of-time compile for the GPU ---------------------------------------------------------

_MOD = "moce_kernels.dispatch.triton"
_FWD_SIG = {
    "x_ptr": "*fp32",
    "sorted_images_ptr": "*i64",
    "out_ptr": "*fp32",
    "B": "i32",
    "F": "i32",
    "NUM_CHUNKS": "i32",
    "IS_FLOAT": "constexpr",
    "BLOCK_F": "constexpr",
}
_BWD_SIG = {
    "grad_out_ptr": "*fp32",
    "inverse_ptr": "*i64",
    "grad_x_ptr": "*fp32",
    "S": "i32",
    "F": "i32",
    "K": "i32",
    "NUM_CHUNKS": "i32",
    "ACC": "constexpr",
    "BLOCK_F": "constexpr",
}


def _fwd(dtype: str, is_float: bool, block: int, **sig) -> dict:
    return {**_FWD_SIG, "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", **sig}, dict(
        IS_FLOAT=is_float, BLOCK_F=block
    )


AOT_SPECS = [
    ("fwd-fp32-4096", _MOD, "dispatch_fwd_kernel", *_fwd("fp32", True, 4096)),
    ("fwd-bf16-1024", _MOD, "dispatch_fwd_kernel", *_fwd("bf16", True, 1024)),
    ("fwd-fp64-i64sizes", _MOD, "dispatch_fwd_kernel", *_fwd("fp64", True, 2048, B="i64", F="i64")),
    ("fwd-u8-i32index", _MOD, "dispatch_fwd_kernel", *_fwd("u8", False, 4096, sorted_images_ptr="*i32")),
    ("bwd-fp32", _MOD, "dispatch_bwd_kernel", _BWD_SIG, dict(ACC="tl.float32", BLOCK_F=4096)),
    (
        "bwd-bf16",
        _MOD,
        "dispatch_bwd_kernel",
        {**_BWD_SIG, "grad_out_ptr": "*bf16", "grad_x_ptr": "*bf16"},
        dict(ACC="tl.float32", BLOCK_F=1024),
    ),
    (
        "bwd-fp64",
        _MOD,
        "dispatch_bwd_kernel",
        {**_BWD_SIG, "grad_out_ptr": "*fp64", "grad_x_ptr": "*fp64"},
        dict(ACC="tl.float64", BLOCK_F=512),
    ),
]


@pytest.mark.parametrize("label", sm90_labels(AOT_SPECS))
def test_kernels_compile_for_sm90(sm90_results, label):
    assert_compiled_for_sm90(sm90_results[label])


def test_module_exports_the_convention_name():
    assert _backend.implementation("dispatch", "triton") is dispatch_triton_module.dispatch_triton
