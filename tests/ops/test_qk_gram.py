"""qk_gram: channel attention's q @ k^T and both squared norms in one pass.

The reference against the official normalise-then-multiply form; the Triton kernels (the
interpreter here, the GPU when there is one) against the reference: forward and both gradients,
odd D (masked tiles, several tiles past 64), N not a multiple of the step and split over several
programs, B = 1, N = 1, empty batches, the strided chunks of a qkv tensor read in place, float32 /
bfloat16 / float64; NaN-filled buffers; bit-for-bit repeats; gradcheck; ``opcheck``;
torch.compile; bad arguments; an ahead-of-time compile of both kernels for sm_90.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import qk_gram
from moce_kernels.qk_gram import qk_gram_reference
from tests.ops._helpers import TRITON_DEVICE, aot_resource_usage, skip_unless_triton_usable

DEVICE = TRITON_DEVICE

#: (B, heads, D, N): D odd and past one 64-row tile; N past several interpreter steps (256).
SHAPES = [
    pytest.param((2, 3, 5, 1000), id="B2-h3-D5-N1000"),
    pytest.param((1, 1, 32, 700), id="B1-D32-N700"),
    pytest.param((1, 1, 64, 300), id="D64"),
    pytest.param((1, 2, 70, 300), id="D70-two-tiles"),
    pytest.param((2, 1, 3, 1), id="N1"),
    pytest.param((1, 1, 16, 4096), id="N4096-split"),
]

#: (dtype, atol, rtol). The outputs are float32 sums of exact products (float64 for float64):
#: the kernels and the reference differ in the order of the sums only. The gradients are stored
#: in the inputs' dtype: one rounding of bfloat16 apart at most.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
]


def _qk(shape, dtype, device=DEVICE, seed=0):
    """q, k as channel attention reads them: chunks of one [B, 3C, N] qkv tensor (strided)."""
    b, heads, d, n = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 3 * heads * d, n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    c = heads * d
    return qkv[:, :c].reshape(shape), qkv[:, c : 2 * c].reshape(shape)


def _scaled_sum(outs, weights):
    return sum((o * w).sum() for o, w in zip(outs, weights, strict=True))


def test_reference_gives_the_official_normalised_product():
    q, k = _qk((2, 2, 6, 50), torch.float64, device="cpu")
    gram, q_sq, k_sq = qk_gram_reference(q, k)
    want = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    got = gram / (q_sq.sqrt()[..., :, None] * k_sq.sqrt()[..., None, :])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert gram.shape == (2, 2, 6, 6) and q_sq.shape == k_sq.shape == (2, 2, 6)


def test_reference_accumulates_bfloat16_in_float32():
    q, k = _qk((1, 1, 4, 64), torch.bfloat16, device="cpu")
    outs = qk_gram_reference(q, k)
    assert all(o.dtype == torch.float32 for o in outs)
    torch.testing.assert_close(outs[0], q.float() @ k.float().transpose(-2, -1))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), ValueError, "q must have 4 dimensions"),
        ((torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 4)), ValueError, "k must have q's shape"),
        ((torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3).double()), TypeError, "k must have dtype"),
        ((torch.zeros(1, 1, 2, 3, dtype=torch.int32),) * 2, TypeError, "q must have dtype"),
        (([1.0], torch.zeros(1, 1, 2, 3)), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        qk_gram(*args)


def test_unknown_backend_is_named():
    q = torch.zeros(1, 1, 2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        qk_gram(q, q, backend="fast")
    with pytest.raises(RuntimeError, match="'cuda' is not implemented"):
        qk_gram(q, q, backend="cuda")


# --- the Triton kernels ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gram_triton():
    skip_unless_triton_usable()
    return importlib.import_module("moce_kernels.qk_gram.triton")


def _check(shape, dtype, atol, rtol, fn):
    q, k = _qk(shape, dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    got = fn(*leaves)
    want = qk_gram_reference(*ref_leaves)
    for g, w, name in zip(got, want, ("gram", "q_sq", "k_sq"), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=atol * max(1.0, shape[3] ** 0.5), rtol=rtol, msg=name)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(w.shape, generator=g, dtype=w.dtype).to(w.device) for w in want]
    _scaled_sum(got, weights).backward()
    _scaled_sum(want, weights).backward()
    for a, b, name in zip(leaves, ref_leaves, ("grad q", "grad k"), strict=True):
        scale = b.grad.abs().max().item() + 1.0
        torch.testing.assert_close(a.grad, b.grad, atol=atol * scale, rtol=rtol, msg=name)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(gram_triton, shape, dtype, atol, rtol):
    _check(shape, dtype, atol, rtol, lambda q, k: qk_gram(q, k, backend="triton"))


def test_contiguous_and_strided_inputs_agree_bit_for_bit(gram_triton):
    q, k = _qk((2, 2, 8, 300), torch.float32)
    assert not q.is_contiguous()
    strided = qk_gram(q, k, backend="triton")
    for a, b in zip(strided, qk_gram(q.contiguous(), k.contiguous(), backend="triton"), strict=True):
        assert torch.equal(a, b)


def test_every_split_covers_its_pixels_once(gram_triton, monkeypatch):
    """One program for the whole of N, or one per step: the same sums up to their order."""
    q, k = _qk((1, 1, 16, 2000), torch.float64)
    want = qk_gram_reference(q, k)
    for programs in (1, 8, 1000):
        monkeypatch.setattr(gram_triton, "_INTERPRETER_PROGRAMS", programs)
        for g, w in zip(qk_gram(q, k, backend="triton"), want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_empty_batch_and_empty_pixels(gram_triton):
    for shape in ((0, 2, 4, 10), (2, 1, 4, 0)):
        q = torch.randn(shape, device=DEVICE, requires_grad=True)
        k = torch.randn(shape, device=DEVICE, requires_grad=True)
        gram, q_sq, k_sq = qk_gram(q, k, backend="triton")
        assert gram.shape == (*shape[:3], shape[2]) and q_sq.shape == k_sq.shape == shape[:3]
        assert not gram.any() and not q_sq.any() and not k_sq.any()
        (gram.sum() + q_sq.sum() + k_sq.sum()).backward()
        assert q.grad.shape == shape and k.grad.shape == shape


def test_every_element_is_written_and_runs_repeat_bit_for_bit(gram_triton, nan_filled_empty):
    q, k = _qk((2, 2, 70, 600), torch.bfloat16)
    q.requires_grad_(), k.requires_grad_()
    runs = []
    for _ in range(2):
        outs = qk_gram(q, k, backend="triton")
        grads = torch.autograd.grad(_scaled_sum(outs, [1.0, 2.0, 3.0]), (q, k))
        runs.append((*outs, *grads))
    for a, b in zip(*runs, strict=True):
        assert not bool(a.isnan().any()), "an element was not written"
        assert torch.equal(a, b)


def test_gradcheck_float64(gram_triton):
    q, k = (t.detach().requires_grad_() for t in _qk((1, 2, 3, 40), torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: qk_gram(a, b, backend="triton"), (q, k), fast_mode=True)


def test_opcheck(gram_triton):
    q, k = (t.detach().requires_grad_() for t in _qk((2, 1, 5, 300), torch.float32))
    torch.library.opcheck(torch.ops.moce_triton.qk_gram_fwd.default, (q, k))


def test_torch_compile_fullgraph(gram_triton):
    q, k = (t.detach().requires_grad_() for t in _qk((1, 2, 6, 300), torch.float32))

    def attention_map(q, k):
        gram, q_sq, k_sq = qk_gram(q, k, backend="triton")
        return (gram / (q_sq.sqrt()[..., :, None] * k_sq.sqrt()[..., None, :])).softmax(-1)

    compiled = torch.compile(attention_map, backend="aot_eager", fullgraph=True)
    out, want = compiled(q, k), attention_map(q, k)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.sum(), (q, k))
    for a, b in zip(grads, torch.autograd.grad(want.sum(), (q, k)), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- ahead-of-time compile for sm_90 -----------------------------------------------------------

AOT_BODY = """
    from moce_kernels.qk_gram import triton as qg

    for label, dtype, t, d in (
        ("bf16", torch.bfloat16, "*bf16", 32), ("bf16-d64", torch.bfloat16, "*bf16", 64),
        ("fp32", torch.float32, "*fp32", 32),
    ):
        strides = {f"{x}_{s}": "i64" for x in "qk" for s in ("sb", "sh", "sd")}
        sig = dict(q_ptr=t, k_ptr=t, gram_ptr="*fp32", q_sq_ptr="*fp32", k_sq_ptr="*fp32", HEADS="i32",
                   D="i32", N="i32", **strides, SPLITS="i32", STEPS_PER_SPLIT="i32", TILES="i32")
        config = qg._config(d, dtype)
        warps = config.pop("num_warps")
        consts = dict(config, USE_DOT=True, DOT_UPCAST=False, ACC=tl.float32)
        compile_("partial-" + label, qg.qk_gram_partial_kernel, sig, consts, warps)
        sig = dict(grad_gram_ptr="*fp32", grad_q_sq_ptr="*fp32", grad_k_sq_ptr="*fp32", q_ptr=t, k_ptr=t,
                   grad_q_ptr=t, grad_k_ptr=t, HEADS="i32", D="i32", N="i32", **strides, TILES="i32",
                   N_BLOCKS="i32")
        config = qg._config(d, dtype, backward=True)
        warps = config.pop("num_warps")
        consts = dict(config, USE_DOT=True, DOT_UPCAST=False, ACC=tl.float32)
        compile_("bwd-" + label, qg.qk_gram_bwd_kernel, sig, consts, warps)
    """


def test_aot_compile_sm90():
    """Both kernels compile for sm_90 (Triton's compiler and ptxas, no GPU) without spills; the
    forward's stacked bfloat16 product runs on Hopper's tensor cores (wgmma), the backward's
    split products on mma."""
    results = aot_resource_usage(AOT_BODY)
    labels = [f"{kernel}-{case}" for case in ("bf16", "bf16-d64", "fp32") for kernel in ("partial", "bwd")]
    assert [r["label"] for r in results] == labels
    for r in results:
        print(r)
        if r["label"].startswith("partial-bf16"):
            assert r["mma"] == "wgmma", r
        if r["label"].startswith("bwd-bf16"):
            assert r["mma"] == "mma", r
        if "STACK" in r:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
