"""dwconv_gate_pointwise (the GDFN's depthwise convolution -> gelu gate -> 1x1 convolution ->
residual add) on the Triton kernel: the interpreter on the CPU here, the GPU when there is one.

Forward and every gradient (x, the depthwise weight and bias, the 1x1 weight and bias, the
residual) against ``dwconv_gate_pointwise_reference`` through the public function with
``backend="triton"``: each bias and the residual on and off, every kernel size, float32, bfloat16
and autocast's mixed dtypes (bfloat16 gate and product, float32 residual), odd widths, B = 1,
1 x 1 planes, an empty batch, tiles forced small so that every loop runs several times;
NaN-filled buffers, determinism, gradcheck, opcheck, torch.compile, bad inputs, and an
ahead-of-time compile for sm_90.

Tolerances: float32 and float64 differ from the reference by the order of their sums only. In
bfloat16 the kernel rounds the gate and the product where the unfused layers do, and one rounding
flipped by a different float32 sum moves a result by an ulp (2^-8 relative); the interpreter also
truncates float32 -> bfloat16 casts (a GPU rounds to nearest), so on the CPU each rounding can be
an ulp off: 2e-2 of the largest value, as for ``fused_pointwise``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from moce_kernels import _backend, dwconv_gelu_gate, fused_pointwise
from moce_kernels.dwconv_gate_pointwise import dwconv_gate_pointwise, dwconv_gate_pointwise_reference
from tests.ops._helpers import TRITON_DEVICE, aot_resource_usage, assert_close_rel, skip_unless_triton_usable

skip_unless_triton_usable()

dgp_triton = importlib.import_module("moce_kernels.dwconv_gate_pointwise.triton")
pw_triton = importlib.import_module("moce_kernels.grouped_pointwise.triton")

DEVICE = TRITON_DEVICE
NAMES = ("x", "dw_weight", "dw_bias", "weight", "bias", "residual")

# (B, Ch, C_out, H, W): x has 2 * Ch channels.
SHAPES = [
    pytest.param((2, 19, 13, 5, 7), id="B2-19to13-5x7"),
    pytest.param((1, 3, 5, 1, 1), id="B1-1x1"),
    pytest.param((3, 1, 2, 2, 3), id="one-gate-channel"),
    pytest.param((1, 4, 1, 7, 2), id="one-output-channel-tall"),
]

# (x dtype, 1x1 weight dtype, residual dtype, relative tolerance): see the module docstring.
DTYPES = [
    pytest.param(torch.float32, torch.float32, torch.float32, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, 2e-2, id="bf16"),
    # Autocast: project_in's output (x) and the product in bfloat16, the residual stream float32.
    pytest.param(torch.bfloat16, torch.bfloat16, torch.float32, 2e-2, id="autocast-bf16"),
]

# (dw_bias, bias, residual)
PARTS = [
    pytest.param(True, True, True, id="biases-residual"),
    pytest.param(False, False, True, id="residual"),
    pytest.param(True, False, False, id="dw-bias"),
    pytest.param(False, True, False, id="bias"),
]


def make_args(
    shape, x_dtype, w_dtype, r_dtype, *, k=3, dw_bias=True, bias=True, residual=True, seed=0
):  # fmt: skip
    """(x, dw_weight, dw_bias, weight, bias, residual) on DEVICE; the depthwise parameters in x's
    dtype (the op's contract: autocast casts them with x)."""
    g = torch.Generator().manual_seed(seed)
    batch, gate, c_out, height, width = shape
    x = torch.randn(batch, 2 * gate, height, width, generator=g)
    dw_weight = torch.randn(2 * gate, k, k, generator=g) / k
    db = torch.randn(2 * gate, generator=g) if dw_bias else None
    weight = torch.randn(c_out, gate, generator=g) / gate**0.5
    b = torch.randn(c_out, generator=g) if bias else None
    r = torch.randn(batch, c_out, height, width, generator=g) if residual else None

    def to(t, dtype):
        return None if t is None else t.to(dtype=dtype, device=DEVICE)

    dtypes = (x_dtype, x_dtype, x_dtype, w_dtype, w_dtype, r_dtype)
    return tuple(to(t, dtype) for t, dtype in zip((x, dw_weight, db, weight, b, r), dtypes, strict=True))


def call(fn, x, dw_weight, dw_bias, weight, bias, residual):
    if fn is dwconv_gate_pointwise_reference:
        return fn(x, dw_weight, dw_bias, weight, bias, residual)
    return fn(x, dw_weight, dw_bias, weight, bias, residual=residual, backend="triton")


def forward_backward(fn, args, seed=1):
    """The output and the gradient of every tensor argument (None where absent)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in args]
    y = call(fn, *leaves)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype).to(DEVICE)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_y))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def assert_matches_reference(args, rtol):
    y, grads = forward_backward(dwconv_gate_pointwise, args)
    y_ref, grads_ref = forward_backward(dwconv_gate_pointwise_reference, args)
    assert_close_rel(y, y_ref, rtol, "y")
    for name, got, want, arg in zip(NAMES, grads, grads_ref, args, strict=True):
        if arg is None:
            continue
        assert got.dtype == arg.dtype, f"grad {name} has dtype {got.dtype}, its argument {arg.dtype}"
        assert_close_rel(got, want, rtol, f"grad {name}")


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide tiles: several output-channel tiles, gate-channel chunks and pixel tiles (whose
    halos cross rows) on small cases."""
    monkeypatch.setattr(pw_triton, "_limits", lambda dtype: (16, 16, 16, 16, 16))


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize(("x_dtype", "w_dtype", "r_dtype", "rtol"), DTYPES)
@pytest.mark.parametrize(("dw_bias", "bias", "residual"), PARTS)
def test_matches_reference(dw_bias, bias, residual, x_dtype, w_dtype, r_dtype, rtol):
    args = make_args(
        (2, 19, 13, 5, 7), x_dtype, w_dtype, r_dtype, dw_bias=dw_bias, bias=bias, residual=residual
    )
    assert_matches_reference(args, rtol)


@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_every_kernel_size_matches_reference(k):
    # 9 x 9 on a 5 x 7 image: most taps of every pixel fall in the zero padding.
    assert_matches_reference(make_args((2, 5, 6, 5, 7), *(torch.float32,) * 3, k=k), 2e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("x_dtype", "w_dtype", "r_dtype", "rtol"), [DTYPES[0], DTYPES[2]])
def test_shapes_match_reference(shape, x_dtype, w_dtype, r_dtype, rtol):
    assert_matches_reference(make_args(shape, x_dtype, w_dtype, r_dtype), rtol)


def test_small_blocks_match_reference(small_blocks):
    # 37 gate channels over three 16-wide chunks, 40 output channels over three tiles, 9 x 11
    # pixels over seven tiles: tile edges fall mid-row and the 3 x 3 halo crosses them.
    blocks = dgp_triton._blocks(40, 37, 99, torch.float32)
    assert blocks["m_blocks"] == 3 and blocks["p_blocks"] == 7 and blocks["block_k"] == 16
    assert_matches_reference(make_args((2, 37, 40, 9, 11), *(torch.float32,) * 3), 2e-5)


def test_float64_matches_reference():
    assert_matches_reference(make_args((2, 7, 5, 3, 4), *(torch.float64,) * 3, k=5), 1e-12)


def test_matches_the_two_unfused_ops():
    """The same roundings as dwconv_gelu_gate followed by fused_pointwise on Triton (the model's
    unfused fast path): in float32 the results differ by the order of the product's sums only."""
    x, dw_weight, dw_bias, weight, bias, residual = make_args((2, 19, 13, 5, 7), *(torch.float32,) * 3)
    gate = dwconv_gelu_gate(x, dw_weight, dw_bias, backend="triton")
    want = fused_pointwise(gate, weight, bias, residual=residual, backend="triton")
    got = call(dwconv_gate_pointwise, x, dw_weight, dw_bias, weight, bias, residual)
    assert_close_rel(got, want, 1e-6, "y")


def test_int64_offsets_give_the_same_bits(monkeypatch):
    """The kernel's variant for images of 2**31 or more elements (channel offsets in int64),
    forced on a small one: the same result, bit for bit."""
    args = make_args((2, 19, 13, 5, 7), torch.bfloat16, torch.bfloat16, torch.float32)
    want = call(dwconv_gate_pointwise, *args)
    common = importlib.import_module("moce_kernels._triton_common")
    monkeypatch.setattr(common, "INT32_OFFSET_LIMIT", 1)
    assert common.int64_offsets(2 * 19 * 35)
    assert torch.equal(call(dwconv_gate_pointwise, *args), want)


def test_empty_batch():
    args = make_args((0, 6, 4, 3, 5), *(torch.float32,) * 3)
    y, grads = forward_backward(dwconv_gate_pointwise, args)
    assert y.shape == (0, 4, 3, 5)
    x, dw_weight, dw_bias, weight, bias, residual = grads
    assert x.shape == (0, 12, 3, 5) and residual.shape == (0, 4, 3, 5)
    for g in (dw_weight, dw_bias, weight, bias):
        assert torch.equal(g, torch.zeros_like(g))


def test_non_contiguous_inputs():
    x, dw_weight, dw_bias, weight, bias, residual = make_args((2, 6, 5, 4, 3), *(torch.float32,) * 3)
    want = call(dwconv_gate_pointwise_reference, x, dw_weight, dw_bias, weight, bias, residual)
    channels_last = torch.channels_last
    got = call(
        dwconv_gate_pointwise,
        x.to(memory_format=channels_last),
        dw_weight.transpose(1, 2).contiguous().transpose(1, 2),
        dw_bias,
        weight.t().contiguous().t(),
        bias,
        residual.to(memory_format=channels_last),
    )
    assert got.is_contiguous()
    assert_close_rel(got, want, 2e-5, "y")


# --- buffers, determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [None, "small_blocks"])
def test_every_element_is_written(blocks, request):
    """With every torch.empty NaN-filled (the output, the backward's recomputed gate, gradients
    and partial sums), the results are the same bits as with the normal buffers."""
    if blocks is not None:
        request.getfixturevalue(blocks)
    args = make_args((2, 37, 40, 5, 7), torch.bfloat16, torch.bfloat16, torch.float32)
    want = forward_backward(dwconv_gate_pointwise, args)
    request.getfixturevalue("nan_filled_empty")
    got = forward_backward(dwconv_gate_pointwise, args)
    for name, a, b in zip(("y", *NAMES), (got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert not bool(a.isnan().any()), f"{name}: an element was not written"
        assert torch.equal(a, b), name


def test_backward_is_deterministic(small_blocks):
    args = make_args((3, 37, 40, 5, 7), torch.bfloat16, torch.bfloat16, torch.bfloat16)
    first = forward_backward(dwconv_gate_pointwise, args)
    second = forward_backward(dwconv_gate_pointwise, args)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1]), strict=True):
        assert torch.equal(a, b)


# --- the ops: gradcheck, opcheck, torch.compile -------------------------------------------------


@pytest.mark.parametrize(("dw_bias", "bias", "residual"), [p.values for p in PARTS[:2]])
def test_gradcheck(dw_bias, bias, residual):
    args = make_args((2, 3, 2, 3, 4), *(torch.float64,) * 3, dw_bias=dw_bias, bias=bias, residual=residual)
    args = [None if t is None else t.requires_grad_(True) for t in args]
    present = [i for i, t in enumerate(args) if t is not None]

    def fn(*leaves):
        full = list(args)
        for i, t in zip(present, leaves, strict=True):
            full[i] = t
        return call(dwconv_gate_pointwise, *full)

    assert torch.autograd.gradcheck(fn, [args[i] for i in present], fast_mode=True)


@pytest.mark.parametrize(
    ("dtypes", "requires_grad"),
    [
        pytest.param((torch.float32,) * 3, True, id="fp32-grad"),
        pytest.param((torch.bfloat16, torch.bfloat16, torch.float32), True, id="autocast-grad"),
        pytest.param((torch.bfloat16,) * 3, False, id="bf16"),
    ],
)
def test_opcheck(dtypes, requires_grad):
    args = [t.requires_grad_(requires_grad) for t in make_args((1, 3, 2, 3, 4), *dtypes)]
    torch.library.opcheck(torch.ops.moce_triton.dwconv_gate_pointwise_fwd.default, tuple(args))
    x, dw_weight, dw_bias, weight, _, residual = (t.detach() for t in args)
    grad_y = torch.randn(residual.shape).to(residual.dtype).to(DEVICE)
    bwd = torch.ops.moce_triton.dwconv_gate_pointwise_bwd.default
    torch.library.opcheck(bwd, (grad_y, x, dw_weight, dw_bias, weight))
    torch.library.opcheck(bwd, (grad_y, x, dw_weight, None, weight))


def test_torch_compile_fullgraph():
    args = [t.requires_grad_(True) for t in make_args((2, 3, 4, 3, 4), *(torch.float32,) * 3)]

    def fn(*a):
        return call(dwconv_gate_pointwise, *a)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, want = compiled(*args), fn(*args)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), args)
    want_grads = torch.autograd.grad(want.square().sum(), args)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_double_backward_raises():
    x, *rest = make_args((1, 3, 2, 2, 2), *(torch.float64,) * 3)
    x.requires_grad_(True)
    out = call(dwconv_gate_pointwise, x, *rest)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    module = importlib.reload(dgp_triton)  # would raise if the ops were defined twice
    args = make_args((1, 3, 2, 2, 2), *(torch.float32,) * 3)
    got = module.dwconv_gate_pointwise_triton(*args)
    assert_close_rel(got, call(dwconv_gate_pointwise_reference, *args), 2e-5, "y")


def test_module_exports_the_convention_name():
    impl = _backend.implementation("dwconv_gate_pointwise", "triton")
    assert impl.__name__ == "dwconv_gate_pointwise_triton"


# --- bad input ------------------------------------------------------------------------------------


def _bad(**changes):
    x, dw_weight, dw_bias, weight, bias, residual = make_args((2, 3, 4, 2, 2), *(torch.float32,) * 3)
    kw = dict(dw_bias=dw_bias, bias=bias, residual=residual, backend="triton")
    kw.update(changes)
    return dwconv_gate_pointwise(
        kw.pop("x", x), kw.pop("dw_weight", dw_weight), kw.pop("dw_bias"), kw.pop("weight", weight), **kw
    )


zeros = torch.zeros


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        pytest.param(dict(x=zeros(6, 2, 2)), ValueError, "x must have 4 dimensions", id="x-rank"),
        pytest.param(dict(x=zeros(2, 6, 2, 2, dtype=torch.int32)), TypeError, "x must have dtype", id="int"),
        pytest.param(dict(x=zeros(2, 5, 2, 2)), ValueError, "even, non-zero channel count", id="x-odd"),
        pytest.param(dict(x=zeros(2, 0, 2, 2)), ValueError, "even, non-zero channel count", id="x-empty"),
        pytest.param(dict(dw_weight=zeros(6, 4, 4)), ValueError, "odd kernel size", id="dw-even-k"),
        pytest.param(dict(dw_weight=zeros(4, 3, 3)), ValueError, "dw_weight must have shape", id="dw-shape"),
        pytest.param(
            dict(dw_weight=zeros(6, 3, 3).double()), TypeError, "dw_weight must have dtype", id="dw-dtype"
        ),
        pytest.param(dict(dw_bias=zeros(5)), ValueError, "dw_bias must have shape", id="dw-bias-shape"),
        pytest.param(dict(weight=zeros(4, 6)), ValueError, r"weight must be \[C_out >= 1, Ch = 3\]", id="w"),
        pytest.param(dict(weight=zeros(4, 3, 1, 1)), ValueError, "weight must have 2 dim", id="weight-4d"),
        pytest.param(dict(weight=zeros(0, 3)), ValueError, "C_out >= 1", id="weight-empty"),
        pytest.param(dict(bias=zeros(5)), ValueError, "bias must have shape", id="bias-shape"),
        pytest.param(dict(residual=zeros(2, 3, 2, 2)), ValueError, "residual must have sh", id="residual"),
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
    ("gate", "c_out", "size"), [(64, 32, 128), (128, 64, 64), (512, 256, 16), (85, 32, 33)],
    ids=["L1", "L2", "latent", "odd"],
)  # fmt: skip
def test_gpu_moce_ir_s_shapes(gate, c_out, size, x_dtype, w_dtype, r_dtype, rtol):
    """The GDFNs of MoCE-IR-S (batch 2) on the GPU's block sizes (and an odd one)."""
    assert_matches_reference(make_args((2, gate, c_out, size, size), x_dtype, w_dtype, r_dtype), rtol)


# --- ahead-of-time compile for sm_90 --------------------------------------------------------------

AOT_BODY = """
    from moce_kernels.dwconv_gate_pointwise import triton as dgp
    from moce_kernels.grouped_pointwise import triton as pw

    TL = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    for label, x_dtype, r_dtype, gate, c_out, k in (
        ("bf16-64to32", torch.bfloat16, torch.bfloat16, 64, 32, 3),
        ("autocast-256to128", torch.bfloat16, torch.float32, 256, 128, 3),
        ("autocast-128to64", torch.bfloat16, torch.float32, 128, 64, 3),
        ("autocast-512to256", torch.bfloat16, torch.float32, 512, 256, 3),
        ("autocast-64to32-k9", torch.bfloat16, torch.float32, 64, 32, 9),
        ("fp32-128to64", torch.float32, torch.float32, 128, 64, 3),
        ("fp64-16to8", torch.float64, torch.float64, 16, 8, 3),
    ):
        b = dgp._blocks(c_out, gate, 128 * 128, x_dtype)
        x, r = "*" + TL[x_dtype], "*" + TL[r_dtype]
        sig = dict(x_ptr=x, dw_ptr=x, db_ptr=x, w_ptr=x, b_ptr=x, r_ptr=r, y_ptr=r, CH="i32", C_OUT="i32",
                   H="i32", W="i32", m_blocks="i32")
        consts = dict(K=k, DW_BIAS=True, HAS_BIAS=True, RESIDUAL=True, **pw._dot_flags(x_dtype),
                      BLOCK_M=b["block_m"], BLOCK_K=b["block_k"], BLOCK_P=b["block_p"],
                      ACC=tl.float64 if x_dtype == torch.float64 else tl.float32,
                      INT64_OFFSETS=False)
        compile_(label, dgp.dwconv_gate_pointwise_kernel, sig, consts, pw._num_warps(x_dtype))
    # Images of 2**31 or more elements: channel offsets in int64.
    consts["INT64_OFFSETS"] = True
    compile_("fp64-16to8-int64", dgp.dwconv_gate_pointwise_kernel, sig, consts, pw._num_warps(x_dtype))
"""


def test_aot_compile_sm90():
    """The forward kernel for sm_90 (Triton's compiler and ptxas, no GPU needed): what the
    interpreter forgives, tensor cores for the bfloat16 products, and no spills on the GPU's
    tiles (``_GPU_BLOCK_*``)."""
    results = aot_resource_usage(AOT_BODY)
    assert len(results) == 8
    for r in results:
        print(r)
        assert (r["mma"] != "fma") == ("bf16" in r["label"] or "autocast" in r["label"]), r
        # float64 (gradcheck's dtype: its speed does not matter) only has to compile: ptxas gives
        # it an 8-byte stack frame at 72 registers (the float64 erf), not a spill.
        if "STACK" in r and "fp64" not in r["label"]:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
