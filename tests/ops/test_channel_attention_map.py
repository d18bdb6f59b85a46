"""channel_attention_map: Restormer's channel-attention map with the normalisation folded onto it.

The reference against the official normalise-multiply-scale-softmax form (and its gradients, an
all-zero row included); the Triton kernels (the interpreter here, the GPU when there is one)
against the reference: the map and the gradients of q, k and the temperature, odd D (masked
tiles; D >= 64 takes several row tiles per map, whose shares of k's and the temperature's
gradients are added), N split over several programs, B = 1, N = 1 and N = 0, empty batches, the
strided chunks of a qkv tensor read in place, float32 / bfloat16 / float64, temperatures of any
shape and dtype; NaN-filled buffers; bit-for-bit repeats; gradcheck; ``opcheck``; torch.compile;
bad arguments; an ahead-of-time compile of both kernels for sm_90.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import channel_attention_map
from moce_kernels.channel_attention_map import channel_attention_map_reference
from tests.ops._helpers import TRITON_DEVICE, aot_resource_usage, skip_unless_triton_usable

DEVICE = TRITON_DEVICE

#: (B, heads, D, N): D odd, maps of 32 rows (one program) and more (64 -> 32 rows a program,
#: 70 -> 16, 130 -> 8), N past several interpreter steps (256) and split.
SHAPES = [
    pytest.param((2, 3, 5, 1000), id="B2-h3-D5-N1000"),
    pytest.param((1, 1, 32, 700), id="B1-D32-N700"),
    pytest.param((1, 1, 64, 300), id="D64"),
    pytest.param((1, 2, 70, 300), id="D70-row-tiles"),
    pytest.param((1, 1, 130, 40), id="D130-row-tiles"),
    pytest.param((2, 1, 3, 1), id="N1"),
    pytest.param((1, 1, 16, 4096), id="N4096-split"),
]

#: (dtype, atol, rtol) of the map (probabilities) and, scaled by each gradient's largest
#: magnitude, of the gradients. The map and its sums are float32 (float64 for float64) in both;
#: the kernels differ in the order of the sums and in exp. bfloat16: the gradients of q and k are
#: stored in bfloat16 (one rounding apart at most).
DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
]


def _qkt(shape, dtype, device=DEVICE, seed=0, t_dtype=None):
    """q, k as channel attention reads them (chunks of one [B, 3C, N] qkv tensor: strided) and a
    [heads, 1, 1] temperature around 1 (the model's parameter)."""
    b, heads, d, n = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 3 * heads * d, n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    c = heads * d
    t = (torch.rand(heads, 1, 1, generator=g, dtype=torch.float64) * 2 + 0.25).to(device)
    t = t.to(t_dtype or (torch.float64 if dtype == torch.float64 else torch.float32))
    return qkv[:, :c].reshape(shape), qkv[:, c : 2 * c].reshape(shape), t


def _official(q, k, t):
    """The official module's form: F.normalize, then the scaled product's softmax (float64)."""
    q, k = F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1)
    return (q @ k.transpose(-2, -1) * t.double().reshape(q.shape[1], 1, 1)).softmax(-1)


def _grads(out, leaves, seed=1):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out * weights.to(out)).sum(), leaves)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def test_reference_is_the_official_function_with_its_gradients():
    q, k, t = _leaves(*_qkt((2, 2, 6, 50), torch.float64, device="cpu"))
    with torch.no_grad():
        q[1, 0, 2] = 0  # an all-zero row: F.normalize divides it by eps
    got, want = channel_attention_map_reference(q, k, t), _official(q, k, t)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for a, b in zip(_grads(got, (q, k, t)), _grads(want, (q, k, t)), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_reference_computes_bfloat16_in_float32():
    q, k, t = _qkt((1, 2, 4, 64), torch.bfloat16, device="cpu")
    got = channel_attention_map_reference(q, k, t)
    assert got.dtype == torch.float32 and got.shape == (1, 2, 4, 4)
    torch.testing.assert_close(got, _official(q.float(), k.float(), t).float(), atol=1e-6, rtol=1e-5)


_Z = torch.zeros(1, 2, 2, 3)
_T = torch.ones(2)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), _T), ValueError, "q must have 4 dimensions"),
        ((_Z, torch.zeros(1, 2, 2, 4), _T), ValueError, "k must have q's shape"),
        ((_Z, _Z.double(), _T), TypeError, "k must have dtype"),
        ((_Z.int(), _Z.int(), _T), TypeError, "q must have dtype"),
        (([1.0], _Z, _T), TypeError, "q must be a torch.Tensor"),
        ((_Z, _Z, 1.0), TypeError, "temperature must be a torch.Tensor"),
        ((_Z, _Z, torch.ones(3, 1, 1)), ValueError, r"one value per head \(q.shape\[1\] = 2\)"),
        ((_Z, _Z, _T.long()), TypeError, "temperature must have dtype"),
    ],
)
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        channel_attention_map(*args)


def test_unknown_backend_is_named():
    q, t = torch.zeros(1, 1, 2, 3), torch.ones(1)
    with pytest.raises(ValueError, match="backend must be one of"):
        channel_attention_map(q, q, t, backend="fast")
    with pytest.raises(RuntimeError, match="'cuda' is not implemented"):
        channel_attention_map(q, q, t, backend="cuda")


# --- the Triton kernels ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def map_triton():
    skip_unless_triton_usable()
    return importlib.import_module("moce_kernels.channel_attention_map.triton")


def _triton(q, k, t):
    return channel_attention_map(q, k, t, backend="triton")


def _temperature_terms(q, k, t, seed=1):
    """sum_ij |d logits_ij * cosine_ij| per head, float64: the magnitude of the terms whose sum is
    the temperature's gradient. They cancel (each row of d logits sums to 0), so its error is
    relative to them, not to the sum."""
    q, k = F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1)
    cosine = q @ k.transpose(-2, -1)
    p = (cosine * t.double().reshape(q.shape[1], 1, 1)).softmax(-1)
    w = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d_logits = p * (w.to(p.device) - (w.to(p.device) * p).sum(-1, keepdim=True))
    return (d_logits * cosine).abs().sum((0, 2, 3))


def _check(q, k, t, atol, rtol):
    leaves, ref_leaves = _leaves(q, k, t), _leaves(q, k, t)
    got, want = _triton(*leaves), channel_attention_map_reference(*ref_leaves)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    got_grads, want_grads = _grads(got, leaves), _grads(want, ref_leaves)
    for a, b, leaf, name in zip(got_grads[:2], want_grads[:2], leaves[:2], ("q", "k"), strict=True):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        # At least the gradient's natural size, |d normalized q| / |q| ~ 1 / sqrt(N): with one
        # pixel the exact gradient is 0 (a normalised scalar is +-1).
        scale = max(b.abs().max().item(), q.shape[-1] ** -0.5)
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol, msg=f"grad {name}")
    a, b = got_grads[2], want_grads[2]
    assert a.dtype == t.dtype and a.shape == t.shape, "grad t"
    terms = _temperature_terms(q, k, t).reshape(t.shape).to(t.dtype)
    assert ((a - b).abs() <= atol * terms + rtol * b.abs()).all(), f"grad t: {a} {b} (terms {terms})"


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(map_triton, shape, dtype, atol, rtol):
    _check(*_qkt(shape, dtype), atol, rtol)


@pytest.mark.parametrize(
    "t_dtype, shape", [(torch.bfloat16, (3,)), (torch.float64, (3, 1, 1)), (torch.float32, (1, 3))]
)
def test_any_temperature_dtype_and_shape(map_triton, t_dtype, shape):
    """The temperature's gradient comes in its own shape and dtype (a bfloat16 model's)."""
    q, k, t = _qkt((2, 3, 8, 100), torch.float32, t_dtype=t_dtype)
    _check(q, k, t.reshape(shape), 1e-6, 1e-5 if t_dtype != torch.bfloat16 else 1e-2)


def test_an_all_zero_row_keeps_normalize_eps(map_triton):
    """|q_i| = 0: the map divides by eps as F.normalize does, and no gradient is NaN."""
    q, k, t = _qkt((1, 2, 8, 100), torch.float64)
    q = q.clone()
    q[0, 1, 3] = 0
    k = k.clone()
    k[0, 0, 5] = 0
    _check(q, k, t, 1e-12, 1e-12)


def test_contiguous_and_strided_inputs_agree_bit_for_bit(map_triton):
    q, k, t = _qkt((2, 2, 8, 300), torch.float32)
    assert not q.is_contiguous()
    assert torch.equal(_triton(q, k, t), _triton(q.contiguous(), k.contiguous(), t))


def test_every_split_is_added_once(map_triton, monkeypatch):
    """One program for the whole of N, or one per step: the same map up to the sums' order."""
    gram_triton = importlib.import_module("moce_kernels.qk_gram.triton")
    q, k, t = _qkt((1, 2, 16, 2000), torch.float64)
    want = channel_attention_map_reference(q, k, t)
    for programs in (1, 8, 1000):
        monkeypatch.setattr(gram_triton, "_INTERPRETER_PROGRAMS", programs)
        torch.testing.assert_close(_triton(q, k, t), want, atol=1e-12, rtol=1e-12)


def test_empty_batch_no_pixels_and_no_rows(map_triton):
    for shape in ((0, 2, 4, 10), (2, 1, 4, 0), (1, 2, 0, 5)):
        q, k, t = _leaves(*_qkt(shape, torch.float32))
        got, want = _triton(q, k, t), channel_attention_map_reference(q, k, t)
        assert got.shape == (*shape[:3], shape[2])
        torch.testing.assert_close(got, want)  # softmax(0) = 1 / D where there are no pixels
        grads = torch.autograd.grad(got.sum(), (q, k, t))
        assert [g.shape for g in grads] == [q.shape, k.shape, t.shape]
        assert not any(g.any() for g in grads)


def test_every_element_is_written_and_runs_repeat_bit_for_bit(map_triton, nan_filled_empty):
    q, k, t = _leaves(*_qkt((2, 2, 70, 600), torch.bfloat16))
    runs = []
    for _ in range(2):
        out = _triton(q, k, t)
        runs.append((out, *_grads(out, (q, k, t))))
    for a, b in zip(*runs, strict=True):
        assert not bool(a.isnan().any()), "an element was not written"
        assert torch.equal(a, b)


def test_gradcheck_float64(map_triton):
    q, k, t = _leaves(*_qkt((1, 2, 3, 40), torch.float64))
    assert torch.autograd.gradcheck(_triton, (q, k, t), fast_mode=True)


def test_the_kept_sums_carry_no_gradient(map_triton):
    """The op's extra outputs (the sums kept for the backward) are marked non-differentiable:
    a gradient through them would be dropped silently otherwise."""
    q, k, t = _leaves(*_qkt((1, 1, 4, 20), torch.float32))
    attn_map, *sums = torch.ops.moce_triton.channel_attention_map_fwd(q, k, t)
    assert attn_map.requires_grad and not any(s.requires_grad for s in sums)
    gram, q_sq, k_sq = sums
    want = importlib.import_module("moce_kernels.qk_gram").qk_gram_reference(q, k)
    for a, b in zip((gram, q_sq, k_sq), want, strict=True):
        torch.testing.assert_close(a, b)


def test_opcheck(map_triton):
    q, k, t = _leaves(*_qkt((2, 3, 5, 300), torch.float32))
    torch.library.opcheck(torch.ops.moce_triton.channel_attention_map_fwd.default, (q, k, t))


def test_torch_compile_fullgraph(map_triton):
    q, k, t = _leaves(*_qkt((1, 2, 6, 300), torch.float32))
    compiled = torch.compile(_triton, backend="aot_eager", fullgraph=True)
    out, want = compiled(q, k, t), _triton(q, k, t)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for a, b in zip(_grads(out, (q, k, t)), _grads(want, (q, k, t)), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_too_wide_a_map_is_refused(map_triton, monkeypatch):
    monkeypatch.setattr(map_triton, "MAX_D", 4)
    q, k, t = _qkt((1, 1, 5, 3), torch.float32)
    with pytest.raises(ValueError, match=r"up to 4 rows per head, got D = 5; use backend='reference'"):
        _triton(q, k, t)


# --- ahead-of-time compile for sm_90 -----------------------------------------------------------

AOT_BODY = """
    from moce_kernels.channel_attention_map import triton as cam

    for d in (32, 64, 130):
        block_r, block_d, _ = cam._tiles(d)
        consts = dict(EPS=cam.EPS, BLOCK_R=block_r, BLOCK_D=block_d, ACC=tl.float32)
        sig = dict(gram_part_ptr="*fp32", q_sq_part_ptr="*fp32", k_sq_part_ptr="*fp32", t_ptr="*fp32",
                   map_ptr="*fp32", gram_ptr="*fp32", q_sq_ptr="*fp32", k_sq_ptr="*fp32", HEADS="i32",
                   D="i32", SPLITS="i32", ROW_TILES="i32")
        compile_(f"fwd-d{d}", cam.attention_map_fwd_kernel, sig, consts, cam._NUM_WARPS)
        sig = dict(grad_map_ptr="*fp32", map_ptr="*fp32", gram_ptr="*fp32", q_sq_ptr="*fp32",
                   k_sq_ptr="*fp32", t_ptr="*fp32", grad_gram_ptr="*fp32", grad_q_sq_ptr="*fp32",
                   grad_k_sq_ptr="*fp32", grad_t_ptr="*fp32", HEADS="i32", D="i32", ROW_TILES="i32")
        compile_(f"bwd-d{d}", cam.attention_map_bwd_kernel, sig, consts, cam._NUM_WARPS)
    """


def test_aot_compile_sm90():
    """Both kernels compile for sm_90 (Triton's compiler and ptxas, no GPU) without spills, for
    MoCE-IR's heads (32 and 64 rows) and a wider map."""
    results = aot_resource_usage(AOT_BODY)
    assert [r["label"] for r in results] == [f"{k}-d{d}" for d in (32, 64, 130) for k in ("fwd", "bwd")]
    for r in results:
        print(r)
        if "STACK" in r:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
