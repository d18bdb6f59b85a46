"""Property-based parity: every fast backend of every op against the op's reference.

The backends are discovered at collection time (``tests.conftest.fast_backends``), so a new
``triton.py`` or ``compiled.py`` is covered as soon as it exists. Inputs vary over batch sizes
(including 0 and 1), odd H x W down to 1 x 1, channel and expert counts, k, routing patterns,
kernel sizes 3..9, dtypes and memory layouts (contiguous, channels_last, sliced).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moce_kernels as mk
from moce_kernels.grouped_dwconv.reference import pack_dwconv_weights
from tests.conftest import fast_backends, make_routing_impl

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
DTYPES = st.sampled_from(list(TOL))
PATTERNS = st.sampled_from(["random", "one_expert", "some_empty"])


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":  # every other element of a wider tensor along the last axis
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


LAYOUTS = st.sampled_from(["contiguous", "channels_last", "sliced"])


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def backends_or_skip(op):
    found = fast_backends(op)
    return found or [pytest.param(None, marks=pytest.mark.skip(reason=f"{op} has no fast backend here"))]


@pytest.mark.parametrize("backend", backends_or_skip("layernorm2d"))
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9)),
    dtype=DTYPES,
    kind=LAYOUTS,
    data=st.data(),
)
def test_layernorm2d(backend, shape, dtype, kind, data):
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    xs = layout(x, kind).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    out = mk.layernorm2d(xs, w, b, backend=backend)
    ref = mk.layernorm2d(xr, w, b, backend="reference")
    close(out, ref, dtype)
    if x.numel():
        grad = torch.randn(shape, generator=g).to(dtype)
        (gx,) = torch.autograd.grad(out, xs, grad)
        (gr,) = torch.autograd.grad(ref, xr, grad)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(gx.float(), gr.float(), atol=atol * 20, rtol=rtol * 10)


def _packed_rows(data, num_experts: int, rows: int, max_channels: int):
    """Per-expert channel counts, offsets with random cuts (empty experts included), a generator."""
    channels = [data.draw(st.integers(1, max_channels)) for _ in range(num_experts)]
    cuts = sorted(
        data.draw(st.lists(st.integers(0, rows), min_size=num_experts - 1, max_size=num_experts - 1))
    )
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    return channels, torch.tensor([0, *cuts, rows]), g


@pytest.mark.parametrize("backend", backends_or_skip("grouped_dwconv"))
@given(
    num_experts=st.integers(1, 4),
    rows=st.integers(0, 5),
    hw=st.tuples(st.integers(1, 11), st.integers(1, 11)),
    dtype=DTYPES,
    kind=LAYOUTS,
    data=st.data(),
)
def test_grouped_dwconv(backend, num_experts, rows, hw, dtype, kind, data):
    channels, offsets, g = _packed_rows(data, num_experts, rows, 6)
    kernels = [data.draw(st.sampled_from([3, 5, 7, 9])) for _ in range(num_experts)]
    weights = [torch.randn(c, 1, k, k, generator=g) / k for c, k in zip(channels, kernels, strict=True)]
    biases = [torch.randn(c, generator=g) for c in channels]
    weight, bias, ch, ks = pack_dwconv_weights(weights, biases)
    x = torch.randn(rows, max(channels), *hw, generator=g).to(dtype)
    weight, bias = weight.to(dtype), bias.to(dtype)
    out = mk.grouped_dwconv(layout(x, kind), weight, bias, offsets, ch, ks, backend=backend)
    ref = mk.grouped_dwconv(x, weight, bias, offsets, ch, ks, backend="reference")
    close(out, ref, dtype)


@pytest.mark.parametrize("backend", backends_or_skip("route"))
@given(batch=st.integers(1, 9), num_experts=st.integers(1, 8), pattern=PATTERNS, data=st.data())
def test_route(backend, batch, num_experts, pattern, data):
    k = data.draw(st.integers(1, num_experts))
    logits, ref = make_routing_impl(batch, num_experts, k, pattern, seed=data.draw(st.integers(0, 2**16)))
    plan = mk.route(logits, k, backend=backend)
    for name in ("experts", "counts", "offsets", "sorted_slots", "sorted_images", "inverse"):
        assert torch.equal(getattr(plan, name), getattr(ref, name)), name
    for name in ("gates", "probs", "noisy_logits"):
        torch.testing.assert_close(getattr(plan, name), getattr(ref, name), atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("op", ["dispatch", "combine"])
@given(
    batch=st.integers(1, 7),
    num_experts=st.integers(1, 5),
    pattern=PATTERNS,
    feat=st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)),
    dtype=DTYPES,
    kind=LAYOUTS,
    data=st.data(),
)
def test_dispatch_and_combine(op, batch, num_experts, pattern, feat, dtype, kind, data):
    backends = fast_backends(op)
    if not backends:
        pytest.skip(f"{op} has no fast backend here")
    k = data.draw(st.integers(1, num_experts))
    _, plan = make_routing_impl(batch, num_experts, k, pattern, seed=data.draw(st.integers(0, 2**16)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    rows = batch if op == "dispatch" else batch * k
    x = torch.randn(rows, *feat, generator=g).to(dtype)
    fn = getattr(mk, op)
    ref = fn(x, plan, backend="reference")
    for backend in backends:
        close(fn(layout(x, kind), plan, backend=backend), ref, dtype)


@pytest.mark.parametrize("backend", backends_or_skip("grouped_pointwise"))
@given(
    num_experts=st.integers(1, 4),
    rows=st.integers(0, 5),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dtype=DTYPES,
    kind=LAYOUTS,
    data=st.data(),
)
def test_grouped_pointwise(backend, num_experts, rows, hw, dtype, kind, data):
    c_in, offsets, g = _packed_rows(data, num_experts, rows, 20)
    c_out = [data.draw(st.integers(1, 20)) for _ in range(num_experts)]
    x = torch.randn(rows, max(c_in), *hw, generator=g).to(dtype)
    weight = (torch.randn(num_experts, max(c_out), max(c_in), generator=g) / 4).to(dtype)
    bias = torch.randn(num_experts, max(c_out), generator=g).to(dtype) if data.draw(st.booleans()) else None
    out = mk.grouped_pointwise(layout(x, kind), weight, bias, offsets, c_in, c_out, backend=backend)
    ref = mk.grouped_pointwise(x, weight, bias, offsets, c_in, c_out, backend="reference")
    atol, rtol = TOL[dtype]
    # A sum over up to 20 products: float32 / bf16 rounding grows with it.
    torch.testing.assert_close(out.float(), ref.float(), atol=atol * 5, rtol=rtol * 2)


def _fused_io_case(data, num_experts, batch, hw, dtype, pattern):
    """(plan, weight [E, Cout_max, Cin_max], bias or None, in widths, out widths, generator)."""
    k = data.draw(st.integers(1, num_experts))
    _, plan = make_routing_impl(batch, num_experts, k, pattern, seed=data.draw(st.integers(0, 2**16)))
    c_in = [data.draw(st.integers(1, 20)) for _ in range(num_experts)]
    c_out = [data.draw(st.integers(1, 20)) for _ in range(num_experts)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    weight = (torch.randn(num_experts, max(c_out), max(c_in), generator=g) / 4).to(dtype)
    bias = torch.randn(num_experts, max(c_out), generator=g).to(dtype) if data.draw(st.booleans()) else None
    return plan, weight, bias, c_in, c_out, g


@pytest.mark.parametrize("backend", backends_or_skip("dispatch_pointwise"))
@given(
    num_experts=st.integers(1, 4),
    batch=st.integers(1, 5),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dtype=DTYPES,
    pattern=PATTERNS,
    kind=LAYOUTS,
    data=st.data(),
)
def test_dispatch_pointwise(backend, num_experts, batch, hw, dtype, pattern, kind, data):
    plan, weight, bias, c_in, c_out, g = _fused_io_case(data, num_experts, batch, hw, dtype, pattern)
    x = torch.randn(batch, max(c_in), *hw, generator=g).to(dtype)
    out = mk.dispatch_pointwise(layout(x, kind), weight, bias, plan, c_in, c_out, backend=backend)
    ref = mk.dispatch_pointwise(x, weight, bias, plan, c_in, c_out, backend="reference")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol * 5, rtol=rtol * 2)


@pytest.mark.parametrize("backend", backends_or_skip("pointwise_combine"))
@given(
    num_experts=st.integers(1, 4),
    batch=st.integers(1, 5),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dtype=DTYPES,
    pattern=PATTERNS,
    kind=LAYOUTS,
    data=st.data(),
)
def test_pointwise_combine(backend, num_experts, batch, hw, dtype, pattern, kind, data):
    plan, weight, bias, c_in, c_out, g = _fused_io_case(data, num_experts, batch, hw, dtype, pattern)
    h = torch.randn(batch * plan.k, max(c_in), *hw, generator=g).to(dtype)
    residual = None
    if data.draw(st.booleans()):
        residual = torch.randn(batch, max(c_out), *hw, generator=g).to(
            data.draw(st.sampled_from([dtype, torch.float32]))
        )
    out = mk.pointwise_combine(layout(h, kind), weight, bias, plan, c_in, c_out, residual, backend=backend)
    ref = mk.pointwise_combine(h, weight, bias, plan, c_in, c_out, residual, backend="reference")
    assert out.dtype == ref.dtype
    atol, rtol = TOL[dtype]
    # k gated rows of sums over up to 20 products, each rounded to the dtype.
    torch.testing.assert_close(out.float(), ref.float(), atol=atol * 8, rtol=rtol * 2)


@pytest.mark.parametrize("backend", backends_or_skip("grouped_layernorm2d"))
@given(
    num_experts=st.integers(1, 4),
    rows=st.integers(0, 5),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dtype=DTYPES,
    kind=LAYOUTS,
    data=st.data(),
)
def test_grouped_layernorm2d(backend, num_experts, rows, hw, dtype, kind, data):
    channels, offsets, g = _packed_rows(data, num_experts, rows, 24)
    x = torch.randn(rows, max(channels), *hw, generator=g).to(dtype)
    w = torch.randn(num_experts, max(channels), generator=g)
    b = torch.randn(num_experts, max(channels), generator=g)
    out = mk.grouped_layernorm2d(layout(x, kind), w, b, offsets, channels, backend=backend)
    ref = mk.grouped_layernorm2d(x, w, b, offsets, channels, backend="reference")
    close(out, ref, dtype)


@pytest.mark.parametrize("backend", backends_or_skip("dwconv_gelu_gate"))
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 12), st.integers(1, 11), st.integers(1, 11)),
    kernel=st.sampled_from([3, 5, 7, 9]),
    dtype=DTYPES,
    kind=LAYOUTS,
    data=st.data(),
)
def test_dwconv_gelu_gate(backend, shape, kernel, dtype, kind, data):
    batch, half, height, width = shape
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(batch, 2 * half, height, width, generator=g).to(dtype)
    weight = (torch.randn(2 * half, kernel, kernel, generator=g) / kernel).to(dtype)
    bias = torch.randn(2 * half, generator=g).to(dtype) if data.draw(st.booleans()) else None
    out = mk.dwconv_gelu_gate(layout(x, kind), weight, bias, backend=backend)
    ref = mk.dwconv_gelu_gate(x, weight, bias, backend="reference")
    close(out, ref, dtype)


@pytest.mark.parametrize("backend", backends_or_skip("dwconv_gate_pointwise"))
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 12), st.integers(1, 11), st.integers(1, 11)),
    c_out=st.integers(1, 9),
    kernel=st.sampled_from([3, 5, 7, 9]),
    dtype=DTYPES,
    kind=LAYOUTS,
    data=st.data(),
)
def test_dwconv_gate_pointwise(backend, shape, c_out, kernel, dtype, kind, data):
    batch, half, height, width = shape
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(batch, 2 * half, height, width, generator=g).to(dtype)
    dw_weight = (torch.randn(2 * half, kernel, kernel, generator=g) / kernel).to(dtype)
    weight = (torch.randn(c_out, half, generator=g) / half**0.5).to(dtype)
    dw_bias, bias, residual = (
        t.to(dtype) if data.draw(st.booleans()) else None
        for t in (
            torch.randn(2 * half, generator=g),
            torch.randn(c_out, generator=g),
            torch.randn(batch, c_out, height, width, generator=g),
        )
    )
    args = (dw_weight, dw_bias, weight, bias)
    out = mk.dwconv_gate_pointwise(layout(x, kind), *args, residual=residual, backend=backend)
    ref = mk.dwconv_gate_pointwise(x, *args, residual=residual, backend="reference")
    close(out, ref, dtype)


#: (B, heads, D, N) of channel attention's q and k: N = 0 and N past the interpreter's steps.
QK_SHAPES = st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(1, 40), st.integers(0, 300))


def qk_chunks(shape, dtype, g):
    """q, k [B, heads, D, N] as channel attention reads them: chunks of one qkv tensor (strided)."""
    batch, heads, d, n = shape
    qkv = torch.randn(batch, 3, heads, d, n, generator=g).to(dtype)
    return qkv[:, 0], qkv[:, 1]


@pytest.mark.parametrize("backend", backends_or_skip("channel_attention_map"))
@given(
    shape=QK_SHAPES,
    dtype=DTYPES,
    data=st.data(),
)
def test_channel_attention_map(backend, shape, dtype, data):
    """The map (probabilities in float32) for q, k read as chunks of one qkv tensor (strided)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k = qk_chunks(shape, dtype, g)
    t = torch.rand(shape[1], 1, 1, generator=g) * 2 + 0.25
    out = mk.channel_attention_map(q, k, t, backend=backend)
    ref = mk.channel_attention_map(q, k, t, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", backends_or_skip("attention_projection_fold"))
@given(
    shape=st.tuples(st.integers(0, 40), st.integers(0, 3), st.integers(1, 4), st.integers(1, 20)),
    dtype=DTYPES,
    transposed=st.booleans(),
    data=st.data(),
)
def test_attention_projection_fold(backend, shape, dtype, transposed, data):
    """W_b for maps laid out either way (a transposed map is read in place)."""
    c_out, batch, heads, d = shape
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    weight = torch.randn(c_out, heads * d, generator=g).to(dtype)
    attn = torch.randn(batch, heads, d, d, generator=g).softmax(-1)
    if transposed:
        attn = attn.transpose(-2, -1).contiguous().transpose(-2, -1)
    out = mk.attention_projection_fold(weight, attn, backend=backend)
    close(out, mk.attention_projection_fold(weight, attn, backend="reference"), dtype)


@pytest.mark.parametrize("backend", backends_or_skip("qk_gram"))
@given(
    shape=QK_SHAPES,
    dtype=DTYPES,
    data=st.data(),
)
def test_qk_gram(backend, shape, dtype, data):
    """q k^T and both squared norms (float32 sums) of q, k read as chunks of one qkv tensor."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k = qk_chunks(shape, dtype, g)
    outs, refs = mk.qk_gram(q, k, backend=backend), mk.qk_gram(q, k, backend="reference")
    for out, ref in zip(outs, refs, strict=True):
        # Sums of up to 300 products of N(0, 1) values: the order of the float32 sums differs.
        torch.testing.assert_close(out, ref, atol=1e-4 * max(1, shape[3]) ** 0.5, rtol=1e-5)
