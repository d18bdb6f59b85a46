"""fused_pointwise (LayerNorm -> 1x1 convolution -> residual add) on the Triton kernel: the
interpreter on the CPU here, the GPU when there is one.

Forward and every gradient (x, weight, bias, the norm's weight and bias, the residual) against
``fused_pointwise_reference`` through the public function with ``backend="triton"``: each of the
norm, bias and residual on and off, float32, bfloat16 and autocast's mixed dtypes (float32 x and
residual, bfloat16 product), odd widths (1, 5, 37 channels), B = 1, 1 x 1 planes, an empty batch,
|mean| >> std, tiles forced small so that every loop runs several times; NaN-filled buffers,
determinism, gradcheck, opcheck, torch.compile, bad inputs, and an ahead-of-time compile for sm_90.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from moce_kernels import _backend
from moce_kernels.fused_pointwise import fused_pointwise, fused_pointwise_reference
from tests.ops._helpers import TRITON_DEVICE, aot_resource_usage, assert_close_rel, skip_unless_triton_usable

skip_unless_triton_usable()

fp_triton = importlib.import_module("moce_kernels.fused_pointwise.triton")
pw_triton = importlib.import_module("moce_kernels.grouped_pointwise.triton")

DEVICE = TRITON_DEVICE

# (B, C_in, C_out, H, W)
SHAPES = [
    pytest.param((2, 37, 40, 5, 7), id="B2-37to40-5x7"),
    pytest.param((1, 5, 3, 1, 1), id="B1-5to3-1x1"),
    pytest.param((3, 1, 4, 2, 3), id="one-input-channel"),
]

# (x dtype, weight dtype, residual dtype, relative tolerance). The reference makes the unfused
# layers' roundings on the same inputs; the kernel differs from it by the order of its float32
# sums, which can flip a bfloat16 rounding (of the normalised x or of the product) by one ulp:
# 2^-8 of the largest value, a few of them in a gradient's sum.
DTYPES = [
    pytest.param(torch.float32, torch.float32, torch.float32, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, 2e-2, id="bf16"),
    pytest.param(torch.float32, torch.bfloat16, torch.float32, 2e-2, id="autocast-bf16"),
]

# (norm, bias, residual)
PARTS = [
    pytest.param(True, True, True, id="norm-bias-residual"),
    pytest.param(True, False, False, id="norm"),
    pytest.param(False, True, True, id="bias-residual"),
    pytest.param(False, False, True, id="residual"),
    pytest.param(True, True, False, id="norm-bias"),
]


def make_args(shape, x_dtype, w_dtype, r_dtype, *, norm=True, bias=True, residual=True, seed=0, offset=0.5):
    """(x, weight, bias, norm_weight, norm_bias, residual) on DEVICE; the norm's parameters in
    float32 (the model's), x with a per-pixel offset (the residual stream is not centred)."""
    g = torch.Generator().manual_seed(seed)
    batch, c_in, c_out, height, width = shape
    x = torch.randn(batch, c_in, height, width, generator=g) + offset * torch.randn(
        batch, 1, height, width, generator=g
    )
    weight = torch.randn(c_out, c_in, generator=g) / c_in**0.5
    b = torch.randn(c_out, generator=g) if bias else None
    norm_weight = 1 + 0.3 * torch.randn(c_in, generator=g) if norm else None
    norm_bias = 0.3 * torch.randn(c_in, generator=g) if norm else None
    r = torch.randn(batch, c_out, height, width, generator=g) if residual else None

    def to(t, dtype):
        return None if t is None else t.to(dtype=dtype, device=DEVICE)

    return (
        to(x, x_dtype),
        to(weight, w_dtype),
        to(b, w_dtype),
        to(norm_weight, torch.float32),
        to(norm_bias, torch.float32),
        to(r, r_dtype),
    )


def call(fn, x, weight, bias, norm_weight, norm_bias, residual, eps=1e-5):
    if fn is fused_pointwise_reference:
        return fn(x, weight, bias, norm_weight, norm_bias, eps, residual)
    norm = dict(norm_weight=norm_weight, norm_bias=norm_bias, eps=eps)
    return fn(x, weight, bias, residual=residual, backend="triton", **norm)


def forward_backward(fn, args, seed=1):
    """The output and the gradient of every tensor argument (None where absent)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in args]
    y = call(fn, *leaves)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype).to(DEVICE)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_y))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def assert_matches_reference(args, rtol):
    y, grads = forward_backward(fused_pointwise, args)
    y_ref, grads_ref = forward_backward(fused_pointwise_reference, args)
    assert_close_rel(y, y_ref, rtol, "y")
    names = ("x", "weight", "bias", "norm_weight", "norm_bias", "residual")
    for name, got, want, arg in zip(names, grads, grads_ref, args, strict=True):
        if arg is None:
            continue
        assert got.dtype == arg.dtype, f"grad {name} has dtype {got.dtype}, its argument {arg.dtype}"
        assert_close_rel(got, want, rtol, f"grad {name}")


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide tiles: several output-channel tiles, input-channel chunks (statistics and product)
    and pixel tiles on small cases."""
    monkeypatch.setattr(pw_triton, "_limits", lambda dtype: (16, 16, 16, 16, 16))


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize(("x_dtype", "w_dtype", "r_dtype", "rtol"), DTYPES)
@pytest.mark.parametrize(("norm", "bias", "residual"), PARTS)
def test_matches_reference(norm, bias, residual, x_dtype, w_dtype, r_dtype, rtol):
    args = make_args((2, 37, 40, 5, 7), x_dtype, w_dtype, r_dtype, norm=norm, bias=bias, residual=residual)
    assert_matches_reference(args, rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("x_dtype", "w_dtype", "r_dtype", "rtol"), [DTYPES[0], DTYPES[2]])
def test_shapes_match_reference(shape, x_dtype, w_dtype, r_dtype, rtol):
    assert_matches_reference(make_args(shape, x_dtype, w_dtype, r_dtype), rtol)


def test_small_blocks_match_reference(small_blocks):
    # 37 input channels over three 16-wide chunks (statistics combined across them), 40 output
    # channels over three tiles, 35 pixels over three tiles.
    blocks = pw_triton._rows_blocks(40, 37, 35, torch.float32)
    assert blocks["m_blocks"] == 3 and blocks["p_blocks"] == 3 and blocks["block_k"] == 16
    assert_matches_reference(make_args((2, 37, 40, 5, 7), *(torch.float32,) * 3), 2e-5)


def test_large_mean_keeps_float32_accuracy(small_blocks):
    """|mean| / std ~ 1e4: statistics of x minus its channel-0 value, combined per chunk, lose
    nothing; the plain float32 E[x^2] - E[x]^2 would lose every digit of the variance."""
    x, weight, bias, norm_weight, norm_bias, residual = make_args((2, 37, 8, 3, 5), *(torch.float32,) * 3)
    x = x + 1e4
    got = call(fused_pointwise, x, weight, bias, norm_weight, norm_bias, residual)
    args64 = [None if t is None else t.double() for t in (x, weight, bias, norm_weight, norm_bias, residual)]
    want = call(fused_pointwise_reference, *args64)
    assert_close_rel(got.double(), want, 1e-4, "y")


def test_int64_offsets_give_the_same_bits(monkeypatch):
    """The forward's variant for images of 2**31 or more elements (channel offsets in int64),
    forced on a small one: the same result, bit for bit. The backward's kernels (grouped_pointwise)
    refuse such images with a named error instead."""
    args = make_args((2, 37, 40, 5, 7), torch.float32, torch.bfloat16, torch.float32)
    want = call(fused_pointwise, *args)
    common = importlib.import_module("moce_kernels._triton_common")
    monkeypatch.setattr(common, "INT32_OFFSET_LIMIT", 1)
    assert torch.equal(call(fused_pointwise, *args), want)
    x = args[0].clone().requires_grad_(True)
    y = call(fused_pointwise, x, *args[1:])
    with pytest.raises(ValueError, match=r"grouped_pointwise: an image \(row\) of .* fewer than 2\*\*31"):
        y.sum().backward()


def test_float64_matches_reference():
    args = make_args((2, 7, 5, 3, 4), *(torch.float64,) * 3)
    assert_matches_reference(args, 1e-12)


def test_empty_batch():
    args = make_args((0, 6, 4, 3, 5), *(torch.float32,) * 3)
    y, grads = forward_backward(fused_pointwise, args)
    assert y.shape == (0, 4, 3, 5)
    x, weight, bias, norm_weight, norm_bias, residual = grads
    assert x.shape == (0, 6, 3, 5) and residual.shape == (0, 4, 3, 5)
    for g in (weight, bias, norm_weight, norm_bias):
        assert torch.equal(g, torch.zeros_like(g))


def test_non_contiguous_inputs():
    x, weight, bias, norm_weight, norm_bias, residual = make_args((2, 6, 5, 4, 3), *(torch.float32,) * 3)
    want = call(fused_pointwise_reference, x, weight, bias, norm_weight, norm_bias, residual)
    channels_last = torch.channels_last
    got = call(
        fused_pointwise,
        x.to(memory_format=channels_last),
        weight.t().contiguous().t(),
        bias,
        norm_weight,
        norm_bias,
        residual.to(memory_format=channels_last),
    )
    assert got.is_contiguous()
    assert_close_rel(got, want, 2e-5, "y")


def per_image_args(dtype, *, residual=True, batch=3, seed=0):
    """(x, [B, C_out, C_in] weight, bias, None, None, residual): a weight per image."""
    x, weight, bias, _, _, r = make_args(
        (batch, 6, 5, 4, 3), dtype, dtype, dtype, norm=False, residual=residual
    )
    g = torch.Generator().manual_seed(seed + 1)
    per_image = (torch.randn(batch, *weight.shape, generator=g) / 6**0.5).to(dtype=dtype, device=DEVICE)
    return x, per_image, bias, None, None, r


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"]
)
def test_per_image_weights_match_reference(dtype, rtol):
    assert_matches_reference(per_image_args(dtype), rtol)


def test_per_image_weights_with_one_image_and_none(small_blocks):
    assert_matches_reference(per_image_args(torch.float32, batch=1), 2e-5)
    y, grads = forward_backward(fused_pointwise, per_image_args(torch.float32, batch=0))
    assert y.shape == (0, 5, 4, 3) and grads[1].shape == (0, 5, 6)


def test_a_channel_chunk_is_read_in_place():
    """v inside attention's qkv tensor: each image's block is contiguous, the batch stride is
    three blocks; the kernel reads it where it lies (no copy), with the same result."""
    x, weight, bias, _, _, residual = make_args((2, 6, 5, 4, 3), *(torch.float32,) * 3, norm=False)
    qkv = torch.randn(2, 18, 4, 3).to(DEVICE)
    v = qkv.chunk(3, dim=1)[2]
    assert not v.is_contiguous() and fp_triton._image_blocks(v) is v
    assert fp_triton._image_blocks(x.mT) is not x.mT  # a transposed image block is copied
    args = (v.requires_grad_(True), weight, bias, None, None, residual)
    assert_matches_reference(args, 2e-5)


# --- buffers, determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [None, "small_blocks"])
def test_every_element_is_written(blocks, request):
    """With every torch.empty NaN-filled (the output, the backward's buffers and partial sums),
    the results are the same bits as with the normal buffers."""
    if blocks is not None:
        request.getfixturevalue(blocks)
    args = make_args((2, 37, 40, 5, 7), torch.float32, torch.bfloat16, torch.float32)
    want = forward_backward(fused_pointwise, args)
    request.getfixturevalue("nan_filled_empty")
    got = forward_backward(fused_pointwise, args)
    names = ("y", "grad x", "grad weight", "grad bias", "grad norm_weight", "grad norm_bias", "grad residual")
    for name, a, b in zip(names, (got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert not bool(a.isnan().any()), f"{name}: an element was not written"
        assert torch.equal(a, b), name


def test_backward_is_deterministic(small_blocks):
    args = make_args((3, 37, 40, 5, 7), torch.bfloat16, torch.bfloat16, torch.bfloat16)
    first = forward_backward(fused_pointwise, args)
    second = forward_backward(fused_pointwise, args)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1]), strict=True):
        assert torch.equal(a, b)


# --- the ops: gradcheck, opcheck, torch.compile -------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "bias", "residual", "per_image"),
    [(*p.values, False) for p in PARTS[:3]] + [(True, True, True, True)],
)
def test_gradcheck(norm, bias, residual, per_image):
    args = make_args((2, 3, 2, 2, 3), *(torch.float64,) * 3, norm=norm, bias=bias, residual=residual)
    if per_image:
        args = (args[0], torch.stack([args[1], 0.5 * args[1].flip(0)]), *args[2:])
    args = [None if t is None else t.double().requires_grad_(True) for t in args]
    present = [i for i, t in enumerate(args) if t is not None]

    def fn(*leaves):
        full = list(args)
        for i, t in zip(present, leaves, strict=True):
            full[i] = t
        return call(fused_pointwise, *full)

    assert torch.autograd.gradcheck(fn, [args[i] for i in present], fast_mode=True)


@pytest.mark.parametrize(
    ("dtypes", "requires_grad"),
    [
        pytest.param((torch.float32,) * 3, True, id="fp32-grad"),
        pytest.param((torch.float32, torch.bfloat16, torch.float32), True, id="autocast-grad"),
        pytest.param((torch.bfloat16,) * 3, False, id="bf16"),
    ],
)
def test_opcheck(dtypes, requires_grad):
    args = make_args((1, 3, 2, 3, 4), *dtypes)
    args = [t.requires_grad_(requires_grad) for t in args]
    torch.library.opcheck(torch.ops.moce_triton.fused_pointwise_fwd.default, (*args[:5], 1e-5, args[5]))
    x, weight, _, norm_weight, norm_bias, residual = (t.detach() for t in args)
    grad_y = torch.randn(residual.shape).to(residual.dtype).to(DEVICE)
    bwd_args = (grad_y, x, weight, norm_weight, norm_bias, 1e-5)
    bwd = torch.ops.moce_triton.fused_pointwise_bwd.default
    torch.library.opcheck(bwd, bwd_args)
    torch.library.opcheck(bwd, (grad_y, x, weight, None, None, 1e-5))


def test_torch_compile_fullgraph():
    args = [t.requires_grad_(True) for t in make_args((2, 3, 4, 3, 4), *(torch.float32,) * 3)]

    def fn(*a):
        return call(fused_pointwise, *a)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, want = compiled(*args), fn(*args)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), args)
    want_grads = torch.autograd.grad(want.square().sum(), args)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_double_backward_raises():
    x, weight, bias, norm_weight, norm_bias, residual = make_args((1, 3, 2, 2, 2), *(torch.float64,) * 3)
    x.requires_grad_(True)
    out = call(fused_pointwise, x, weight, bias, norm_weight, norm_bias, residual)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    module = importlib.reload(fp_triton)  # would raise if the ops were defined twice
    args = make_args((1, 3, 2, 2, 2), *(torch.float32,) * 3)
    got = module.fused_pointwise_triton(*args[:5], 1e-5, args[5])
    assert_close_rel(got, call(fused_pointwise_reference, *args), 2e-5, "y")


def test_module_exports_the_convention_name():
    assert _backend.implementation("fused_pointwise", "triton").__name__ == "fused_pointwise_triton"


# --- bad input ------------------------------------------------------------------------------------


def _bad(**changes):
    x, weight, bias, norm_weight, norm_bias, residual = make_args((2, 3, 4, 2, 2), *(torch.float32,) * 3)
    kw = dict(bias=bias, norm_weight=norm_weight, norm_bias=norm_bias, residual=residual, backend="triton")
    kw.update(changes)
    return fused_pointwise(kw.pop("x", x), kw.pop("weight", weight), **kw)


zeros = torch.zeros


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        pytest.param(dict(x=zeros(3, 2, 2)), ValueError, "x must have 4 dimensions", id="x-rank"),
        pytest.param(dict(x=zeros(2, 3, 2, 2, dtype=torch.int32)), TypeError, "x must have dtype", id="int"),
        pytest.param(dict(x=zeros(2, 0, 2, 2)), ValueError, "at least one channel", id="x-no-channels"),
        pytest.param(dict(weight=zeros(4, 5)), ValueError, "weight must be", id="weight-width"),
        pytest.param(dict(weight=zeros(4, 3, 1, 1)), ValueError, "weight must be", id="weight-4d"),
        pytest.param(dict(weight=zeros(3, 4, 3)), ValueError, r"\[B = 2, C_out, C_in\]", id="weight-batch"),
        pytest.param(dict(bias=zeros(5)), ValueError, "bias must have shape", id="bias-shape"),
        pytest.param(dict(norm_bias=None), ValueError, "together", id="norm-half"),
        pytest.param(dict(norm_weight=zeros(4)), ValueError, "norm_weight must have sh", id="norm-shape"),
        pytest.param(dict(residual=zeros(2, 3, 2, 2)), ValueError, "residual must have sh", id="residual"),
        pytest.param(dict(eps=0.0), ValueError, "eps must be > 0", id="eps-zero"),
        pytest.param(dict(eps="1e-5"), TypeError, "eps must be a float", id="eps-str"),
        pytest.param(dict(backend="cuda"), RuntimeError, "not implemented", id="no-cuda-kernel"),
    ],
)
def test_bad_input_is_named(changes, error, match):
    with pytest.raises(error, match=match):
        _bad(**changes)


# --- GPU only -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("x_dtype", "w_dtype", "r_dtype", "rtol"), DTYPES)
@pytest.mark.parametrize(
    ("c_in", "c_out", "size"),
    [(48, 144, 128), (96, 96, 64), (192, 1020, 32), (384, 384, 16)],
    ids=["qkv-L1", "proj-L2", "project-in-L3", "latent"],
)
def test_gpu_moce_ir_s_shapes(c_in, c_out, size, x_dtype, w_dtype, r_dtype, rtol):
    """The trunk's 1x1 convolutions of MoCE-IR-S (batch 2) on the GPU's block sizes."""
    assert_matches_reference(make_args((2, c_in, c_out, size, size), x_dtype, w_dtype, r_dtype), rtol)


# --- ahead-of-time compile for sm_90 --------------------------------------------------------------

AOT_BODY = """
    from moce_kernels.fused_pointwise import triton as fp
    from moce_kernels.grouped_pointwise import triton as pw

    TL = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    for label, x_dtype, w_dtype, c_in, c_out, norm, residual in (
        ("norm-bf16-48to144", torch.bfloat16, torch.bfloat16, 48, 144, True, False),
        ("norm-autocast-48to144", torch.float32, torch.bfloat16, 48, 144, True, False),
        ("norm-autocast-384to1020", torch.float32, torch.bfloat16, 384, 1020, True, False),
        ("residual-autocast-96", torch.bfloat16, torch.bfloat16, 96, 96, False, True),
        ("norm-residual-fp32-96", torch.float32, torch.float32, 96, 96, True, True),
        ("norm-residual-fp64", torch.float64, torch.float64, 48, 48, True, True),
    ):
        dtype = w_dtype
        b = fp._blocks(c_out, c_in, 128 * 128, dtype)
        x, w = "*" + TL[x_dtype], "*" + TL[w_dtype]
        out = "*fp32" if residual and x_dtype == torch.float32 else w
        sig = dict(x_ptr=x, w_ptr=w, b_ptr=w, g_ptr="*fp32", nb_ptr="*fp32", r_ptr=out if residual else x,
                   y_ptr=out, C_IN="i32", C_OUT="i32", P="i32", m_blocks="i32", x_batch_stride="i32",
                   w_batch_stride="i32", eps="fp32")
        consts = dict(NORM=norm, HAS_BIAS=True, RESIDUAL=residual, **pw._dot_flags(dtype),
                      BLOCK_M=b["block_m"], BLOCK_K=b["block_k"], BLOCK_P=b["block_p"],
                      ACC=tl.float64 if dtype == torch.float64 else tl.float32, INT64_OFFSETS=False)
        compile_(label, fp.fused_pointwise_kernel, sig, consts, pw._num_warps(dtype))
"""


def test_aot_compile_sm90():
    """The forward kernel for sm_90 (Triton's compiler and ptxas, no GPU needed): what the
    interpreter forgives, tensor cores for the bfloat16 products, and no spills."""
    results = aot_resource_usage(AOT_BODY)
    assert len(results) == 6
    for r in results:
        print(r)
        tensor_cores = "bf16" in r["label"] or "autocast" in r["label"]
        assert (r["mma"] != "fma") == tensor_cores, r
        if "STACK" in r:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
