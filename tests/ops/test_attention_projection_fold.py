"""attention_projection_fold: channel attention's projection folded with each image's map.

The reference against the block-diagonal definition; the Triton kernel (the interpreter here,
the GPU when there is one) against the reference: forward and both gradients, odd C_out (masked
row tiles), D past one tile (the contraction and the columns looped over tiles), one head, B = 1
and B = 0, a strided map (read in place), float32 / bfloat16 / float64; NaN-filled buffers;
gradcheck; ``opcheck``; torch.compile; bad arguments; an ahead-of-time compile for sm_90.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from moce_kernels import attention_projection_fold
from moce_kernels.attention_projection_fold import attention_projection_fold_reference
from tests.ops._helpers import TRITON_DEVICE, aot_resource_usage, skip_unless_triton_usable

DEVICE = TRITON_DEVICE

#: (C_out, B, heads, D).
SHAPES = [
    pytest.param((48, 2, 3, 16), id="trunk-like"),
    pytest.param((37, 1, 2, 5), id="odd"),
    pytest.param((100, 2, 2, 70), id="D70-tiles"),
    pytest.param((8, 3, 1, 32), id="one-head"),
]

#: (dtype, atol, rtol): the products are summed in float32 (float64) and rounded once to the
#: weight's dtype in both; bfloat16 results may be one rounding apart.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
]


def _inputs(shape, dtype, device=DEVICE, seed=0):
    """weight [C_out, heads * D] in dtype, a softmax map [B, heads, D, D] in float32 (float64)."""
    c_out, b, heads, d = shape
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, heads * d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    map_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    attn = torch.randn(b, heads, d, d, generator=g, dtype=torch.float64).softmax(-1)
    return weight, attn.to(device=device, dtype=map_dtype)


def test_reference_is_the_block_diagonal_product():
    weight, attn = _inputs((6, 2, 3, 4), torch.float64, device="cpu")
    want = torch.stack([weight @ torch.block_diag(*attn[b]) for b in range(2)])
    torch.testing.assert_close(attention_projection_fold_reference(weight, attn), want)


def test_reference_rounds_the_map_to_the_weights_dtype():
    weight, attn = _inputs((4, 1, 2, 3), torch.bfloat16, device="cpu")
    got = attention_projection_fold_reference(weight, attn)
    assert got.dtype == torch.bfloat16
    want = attention_projection_fold_reference(weight.float(), attn.bfloat16().float()).bfloat16()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


_W, _A = torch.zeros(4, 6), torch.zeros(1, 2, 3, 3)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.zeros(4, 6, 1), _A), ValueError, "weight must have 2 dimensions"),
        ((_W, torch.zeros(2, 3, 3)), ValueError, "attn must have 4 dimensions"),
        ((_W, torch.zeros(1, 2, 3, 4)), ValueError, r"attn must hold square \[D, D\] maps"),
        ((torch.zeros(4, 5), _A), ValueError, "weight must have heads . D = 6 input channels"),
        ((_W.int(), _A), TypeError, "weight must have dtype"),
        ((_W, _A.long()), TypeError, "attn must have dtype"),
        ((_W, [1.0]), TypeError, "attn must be a torch.Tensor"),
    ],
)
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        attention_projection_fold(*args)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        attention_projection_fold(_W, _A, backend="fast")
    with pytest.raises(RuntimeError, match="'cuda' is not implemented"):
        attention_projection_fold(_W, _A, backend="cuda")


# --- the Triton kernel ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fold_triton():
    skip_unless_triton_usable()
    return importlib.import_module("moce_kernels.attention_projection_fold.triton")


def _triton(weight, attn):
    return attention_projection_fold(weight, attn, backend="triton")


def _check(weight, attn, atol, rtol):
    leaves = [t.detach().clone().requires_grad_() for t in (weight, attn)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (weight, attn)]
    got, want = _triton(*leaves), attention_projection_fold_reference(*ref_leaves)
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, b, name in zip(
        torch.autograd.grad(got, leaves, g.to(got)),
        torch.autograd.grad(want, ref_leaves, g.to(want)),
        ("weight", "attn"),
        strict=True,
    ):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol * (b.abs().max().item() + 1e-30), rtol=rtol, msg=name)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(fold_triton, shape, dtype, atol, rtol):
    _check(*_inputs(shape, dtype), atol, rtol)


def test_a_strided_map_is_read_in_place(fold_triton):
    weight, attn = _inputs((20, 2, 2, 8), torch.float32)
    transposed = attn.transpose(-2, -1).contiguous().transpose(-2, -1)
    assert not transposed.is_contiguous()
    assert torch.equal(_triton(weight, transposed), _triton(weight, attn))


def test_empty_batch_and_no_output_rows(fold_triton):
    for shape in ((4, 0, 2, 3), (0, 2, 2, 3)):
        weight, attn = (t.requires_grad_() for t in _inputs(shape, torch.float32))
        out = _triton(weight, attn)
        assert out.shape == (shape[1], shape[0], shape[2] * shape[3])
        grads = torch.autograd.grad(out.sum(), (weight, attn), allow_unused=True)
        assert [g.shape for g in grads] == [weight.shape, attn.shape] and not any(g.any() for g in grads)


def test_every_element_is_written(fold_triton, nan_filled_empty):
    weight, attn = _inputs((100, 2, 2, 70), torch.bfloat16)
    out = _triton(weight, attn)
    assert not bool(out.isnan().any()), "an element was not written"
    assert torch.equal(out, _triton(weight, attn))


def test_gradcheck_float64(fold_triton):
    weight, attn = (t.requires_grad_() for t in _inputs((5, 2, 2, 3), torch.float64))
    assert torch.autograd.gradcheck(_triton, (weight, attn), fast_mode=True)


def test_opcheck(fold_triton):
    weight, attn = (t.requires_grad_() for t in _inputs((9, 2, 3, 4), torch.float32))
    torch.library.opcheck(torch.ops.moce_triton.attention_projection_fold_fwd.default, (weight, attn))


def test_torch_compile_fullgraph(fold_triton):
    weight, attn = (t.requires_grad_() for t in _inputs((9, 2, 3, 4), torch.float32))
    compiled = torch.compile(_triton, backend="aot_eager", fullgraph=True)
    out, want = compiled(weight, attn), _triton(weight, attn)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for a, b in zip(
        torch.autograd.grad(out.sum(), (weight, attn)),
        torch.autograd.grad(want.sum(), (weight, attn)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- ahead-of-time compile for sm_90 -----------------------------------------------------------

AOT_BODY = """
    from moce_kernels.attention_projection_fold import triton as apf

    for label, dtype, t, d in (
        ("bf16-d32", torch.bfloat16, "*bf16", 32), ("bf16-d64", torch.bfloat16, "*bf16", 64),
        ("fp32-d32", torch.float32, "*fp32", 32), ("fp32-d64", torch.float32, "*fp32", 64),
    ):
        sig = dict(w_ptr=t, attn_ptr="*fp32", out_ptr=t, HEADS="i32", D="i32", C_OUT="i32", a_sb="i64",
                   a_sh="i64", a_sd="i64", a_se="i64", O_TILES="i32", E_TILES="i32")
        config = apf._config(d, dtype)
        warps = config.pop("num_warps")
        consts = dict(config, USE_DOT=True, DOT_UPCAST=False, ACC=tl.float32)
        compile_(label, apf.attention_projection_fold_kernel, sig, consts, warps)
    """


def test_aot_compile_sm90():
    """The kernel compiles for sm_90 (Triton's compiler and ptxas, no GPU) without spills, its
    bfloat16 products on the tensor cores."""
    results = aot_resource_usage(AOT_BODY)
    assert [r["label"] for r in results] == ["bf16-d32", "bf16-d64", "fp32-d32", "fp32-d64"]
    for r in results:
        print(r)
        if r["label"].startswith("bf16"):
            assert r["mma"] in ("mma", "wgmma"), r
        if "STACK" in r:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
