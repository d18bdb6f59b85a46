"""The GDFN (FeedForward) on the fused ops: ``dwconv_gelu_gate`` (depthwise conv + gate), and
``dwconv_gate_pointwise`` (the whole tail after project_in). With backend "triton" (the
interpreter here) each is the same function as the unfused reference module code, forward and
every gradient, also under bf16 autocast; the reference backend, and the backends the fused ops
have no kernel of, keep the unfused code bit for bit; parameters and state-dict keys unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import _backend
from moce_kernels._backend import is_available
from moceir.layers import attention
from moceir.layers.attention import FeedForward
from tests.conftest import needs_triton_on_cpu

needs_triton = needs_triton_on_cpu  # CPU tensors

#: Restormer's expansion 2.66 on 6 channels: hidden = 15, so the depthwise conv has 30 channels
#: (no multiple of any block).
DIM, EXPANSION = 6, 2.66


def make_pair(bias: bool, backend: str) -> tuple[FeedForward, FeedForward]:
    """(reference, ``backend``) FeedForwards with the same perturbed parameters."""
    torch.manual_seed(0)
    ref = FeedForward(DIM, EXPANSION, bias)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.dwconv.backend = "reference"
    fast = FeedForward(DIM, EXPANSION, bias)
    fast.load_state_dict(ref.state_dict())
    fast.dwconv.backend = backend
    return ref, fast


def count_calls(monkeypatch, op_name: str) -> list[str]:
    """The backends FeedForward passes to ``attention.<op_name>``, one entry per call."""
    calls: list[str] = []
    op = getattr(attention, op_name)

    def counting(*args, backend, **kwargs):
        calls.append(backend)
        return op(*args, backend=backend, **kwargs)

    monkeypatch.setattr(attention, op_name, counting)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """dwconv_gelu_gate's calls (the fused tail's are counted in ``tail_calls``)."""
    return count_calls(monkeypatch, "dwconv_gelu_gate")


@pytest.fixture
def tail_calls(monkeypatch):
    """dwconv_gate_pointwise's calls."""
    return count_calls(monkeypatch, "dwconv_gate_pointwise")


#: FeedForward's fast paths on backend "triton": the gate op then project_out, or the fused tail.
PATHS = [pytest.param(False, id="gate-op"), pytest.param(True, id="fused-tail")]


def expected_calls(tail: bool, backend: str = "triton") -> tuple[list[str], list[str]]:
    """(dwconv_gelu_gate's calls, dwconv_gate_pointwise's) of one forward on that path."""
    return ([], [backend]) if tail else ([backend], [])


def unfused(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """The GDFN written out with torch.nn.functional (what FeedForward computed before the fusion)."""
    conv = ff.dwconv
    h = F.conv2d(x, ff.project_in.weight, ff.project_in.bias)
    h = F.conv2d(h, conv.weight, conv.bias, padding=1, groups=conv.in_channels)
    x1, x2 = h.chunk(2, dim=1)
    return F.conv2d(F.gelu(x1) * x2, ff.project_out.weight, ff.project_out.bias)


def test_parameters_and_keys_are_unchanged():
    ff = FeedForward(DIM, EXPANSION, True)
    assert int(DIM * EXPANSION) == 15
    shapes = {k: tuple(v.shape) for k, v in ff.state_dict().items()}
    assert shapes == {
        "project_in.weight": (30, 6, 1, 1),
        "project_in.bias": (30,),
        "dwconv.weight": (30, 1, 3, 3),
        "dwconv.bias": (30,),
        "project_out.weight": (6, 15, 1, 1),
        "project_out.bias": (6,),
    }


@needs_triton
@pytest.mark.parametrize("tail", PATHS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
def test_triton_matches_reference_with_gradients(bias, tail, residual, fused_calls, tail_calls):
    ref, fast = make_pair(bias, "triton")
    fast.project_out.fuse_neighbours = tail
    x = torch.randn(2, DIM, 13, 21)
    skip = torch.randn(2, DIM, 13, 21) if residual else None
    with torch.no_grad():
        torch.testing.assert_close(
            fast.eval()(x, residual=skip), ref.eval()(x, residual=skip), atol=1e-5, rtol=1e-5
        )
    assert (fused_calls, tail_calls) == expected_calls(tail)
    leaves_ref = [x.clone().requires_grad_(True), *ref.parameters()]
    leaves_fast = [x.clone().requires_grad_(True), *fast.parameters()]
    grad_out = torch.randn(2, DIM, 13, 21, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad(ref.train()(leaves_ref[0], residual=leaves_ref[0]), leaves_ref, grad_out)
    got = torch.autograd.grad(fast.train()(leaves_fast[0], residual=leaves_fast[0]), leaves_fast, grad_out)
    names = ["x", *(n for n, _ in fast.named_parameters())]
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@needs_triton
@pytest.mark.parametrize("tail", PATHS)
def test_triton_under_bf16_autocast(tail, fused_calls, tail_calls):
    # The ops take the autocast dtype for input and parameters (like DepthwiseConv2d); the
    # float32 parameters still get float32 gradients.
    ref, fast = make_pair(True, "triton")
    fast.project_out.fuse_neighbours = tail
    x = torch.randn(1, DIM, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fast(x), ref(x)
        loss = got.float().square().sum()
    assert got.dtype == want.dtype == torch.bfloat16
    assert (fused_calls, tail_calls) == expected_calls(tail)
    # Two bf16 computations of the same function: a few bf16 roundings apart.
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    params = [fast.dwconv.weight, fast.project_out.weight, fast.project_out.bias]
    for grad in torch.autograd.grad(loss, params):
        assert grad.dtype == torch.float32 and bool(grad.isfinite().all())


@needs_triton
def test_fused_tail_with_a_float32_residual_under_autocast(tail_calls):
    """The block's skip (float32) added to the bf16 product: a float32 result, as the unfused
    ``bf16_conv(gate) + x`` gives."""
    ref, fast = make_pair(True, "triton")
    x = torch.randn(1, DIM, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fast(x, residual=x), ref(x, residual=x)
    assert got.dtype == want.dtype == torch.float32 and tail_calls == ["triton"]
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


@needs_triton
def test_a_broadcast_residual_keeps_the_unfused_add(fused_calls, tail_calls):
    ref, fast = make_pair(True, "triton")
    x = torch.randn(2, DIM, 5, 4)
    skip = torch.randn(1, DIM, 1, 4)
    torch.testing.assert_close(fast(x, residual=skip), ref(x, residual=skip), atol=1e-5, rtol=1e-5)
    assert (fused_calls, tail_calls) == (["triton"], [])


@needs_triton
@pytest.mark.parametrize("tail", PATHS)
def test_triton_compiles_to_one_graph(tail, fused_calls, tail_calls):
    # The backend choice (op_backend / resolve_backend) and the autocast check trace as
    # constants: no graph break around the fused op.
    ref, fast = make_pair(True, "triton")
    fast.project_out.fuse_neighbours = tail
    x = torch.randn(1, DIM, 5, 6)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)
    assert (fused_calls, tail_calls) == expected_calls(tail)


def test_reference_backend_is_the_unfused_code(fused_calls, tail_calls):
    ref, _ = make_pair(True, "triton")
    x = torch.randn(2, DIM, 5, 4)
    assert torch.equal(ref(x), unfused(ref, x))
    assert fused_calls == [] and tail_calls == []


@pytest.fixture
def no_fused_kernel(monkeypatch):
    """The state before dwconv_gelu_gate had C++ / CUDA kernels: no "cpu" / "cuda" backend of it
    (every other op unchanged)."""
    implemented, compiled_usable = _backend.implemented, _backend._compiled_usable

    def without_compiled(op):
        have = implemented(op)
        return have - {"cpu", "cuda"} if op == "dwconv_gelu_gate" else have

    monkeypatch.setattr(_backend, "implemented", without_compiled)
    monkeypatch.setattr(
        _backend,
        "_compiled_usable",
        lambda op, device: op != "dwconv_gelu_gate" and compiled_usable(op, device),
    )


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_backends_without_a_fused_kernel_keep_the_unfused_code(
    backend, no_fused_kernel, fused_calls, tail_calls
):
    """Where the fused op has no kernel of the model's backend, FeedForward runs the unfused
    module code (its depthwise convolution on that backend's grouped_dwconv), not the op's
    reference: nothing changes for that backend."""
    if backend == "cpu" and not is_available("cpu"):
        pytest.skip("moce_kernels._C is not built")
    _, ff = make_pair(True, backend)
    x = torch.randn(2, DIM, 5, 4)
    x1, x2 = ff.dwconv(ff.project_in(x)).chunk(2, dim=1)
    assert torch.equal(ff(x), ff.project_out(F.gelu(x1) * x2))
    assert fused_calls == [] and tail_calls == []


def test_cuda_without_a_fused_kernel_keeps_the_unfused_code(no_fused_kernel):
    _, ff = make_pair(True, "cuda")
    assert ff._gate_backend(torch.randn(1, DIM, 3, 3)) == "reference"  # the unfused code


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_cpu_backends_fuse_once_the_op_has_a_cpu_kernel(backend, fused_calls, tail_calls):
    x = torch.randn(2, DIM, 7, 5)
    try:
        chosen = _backend.resolve_backend("dwconv_gelu_gate", backend, x.device)
    except RuntimeError as e:
        pytest.skip(f"no usable C++ kernel of dwconv_gelu_gate here: {e}")
    if chosen == "reference":
        pytest.skip("dwconv_gelu_gate has no C++ kernel here")
    ref, fast = make_pair(True, backend)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    assert fused_calls == ["cpu"] and tail_calls == []  # no C++ kernel of the fused tail


@needs_triton
def test_mismatched_dtypes_keep_the_unfused_error(fused_calls, tail_calls):
    # Without autocast the op needs the activations in the parameters' dtype; other inputs get
    # nn.Conv2d's own error, as before the fusion, not the op's.
    ref, fast = make_pair(True, "triton")
    for ff in (ref, fast):
        ff.project_in.double()
    x = torch.randn(1, DIM, 5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        fast(x)
    assert str(got.value) == str(want.value) and fused_calls == [] and tail_calls == []
