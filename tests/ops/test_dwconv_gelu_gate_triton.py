"""dwconv_gelu_gate on the Triton kernels: the interpreter on the CPU here, the GPU when there is one.

Forward and every gradient (x, weight, bias) against ``dwconv_gelu_gate_reference`` (the Triton
side through the public function with ``backend="triton"``, so the plumbing runs too): kernel sizes
3, 5, 7, 9, with and without bias, B = 1 and B = 0, 13 x 21 and 1 x 1 planes, planes over several
tiles (the halo crosses tile borders), gate widths that are not multiples of any block, several
channel blocks per image; fp32 / fp64 tight, bf16 / fp16 to one rounding; non-contiguous inputs;
NaN-filled buffers; determinism; gradcheck, ``opcheck``, torch.compile, and an ahead-of-time
compile of every kernel for sm_90 (registers and spills).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from moce_kernels import _backend
from moce_kernels.dwconv_gelu_gate import dwconv_gelu_gate, dwconv_gelu_gate_reference
from tests.ops._helpers import TRITON_DEVICE, aot_resource_usage, skip_unless_triton_usable

skip_unless_triton_usable()

# Imported by path: the package's attribute of the same name would be the function.
gate_triton = importlib.import_module("moce_kernels.dwconv_gelu_gate.triton")
dw_triton = importlib.import_module("moce_kernels.grouped_dwconv.triton")
dwconv_gelu_gate_triton = gate_triton.dwconv_gelu_gate_triton

#: The interpreter runs on CPU tensors; compiled Triton needs CUDA tensors.
DEVICE = TRITON_DEVICE

# (B, Ch, H, W, K). The interpreter's cost is per program and per tap: the 9x9 cases stay small.
CASES = [
    pytest.param((2, 5, 13, 21, 3), id="k3-B2-Ch5-13x21"),
    pytest.param((1, 3, 1, 1, 9), id="k9-B1-1x1"),
    pytest.param((1, 7, 13, 21, 5), id="k5-B1-Ch7-13x21"),
    pytest.param((1, 2, 9, 11, 7), id="k7-9x11"),
    pytest.param((2, 1, 5, 6, 9), id="k9-wider-than-the-image"),
    # 20 x 70 and 17 x 65 planes take 2 x 2 tiles (16 x 64): the halo crosses tile borders.
    pytest.param((1, 3, 20, 70, 3), id="k3-20x70-tiles"),
    pytest.param((1, 1, 17, 65, 7), id="k7-17x65-tiles"),
    pytest.param((0, 3, 5, 6, 3), id="B0"),
]
HALF_CASES = [CASES[0], CASES[1], CASES[5]]

# (dtype, atol, rtol): the expectation is the reference (float32 math on the same rounded values;
# float64 for float64). fp32 differs by float32 rounding (another order of the taps' sums,
# Triton's erf / exp); bf16 / fp16 by that plus one rounding of each result to the dtype (eps
# 7.8e-3 / 9.8e-4; values O(1..10)). Weight / bias gradients sum over B * H * W terms: their atol
# grows with the square root of that count.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
]
HALF_DTYPES = [
    pytest.param(torch.bfloat16, 1.6e-2, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-3, 1e-3, id="fp16"),
]
FP32_TOL = (1e-5, 1e-5)


def make_inputs(batch, gate, height, width, k, *, dtype=torch.float32, bias=True, seed=0):
    """x [B, 2 * Ch, H, W], weight [2 * Ch, K, K] (scaled by 1 / K), bias [2 * Ch] on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2 * gate, height, width, generator=g)
    weight = torch.randn(2 * gate, k, k, generator=g) / k
    b = torch.randn(2 * gate, generator=g) if bias else None
    return tuple(None if t is None else t.to(dtype=dtype, device=DEVICE) for t in (x, weight, b))


def grad_output(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    shape = (x.shape[0], x.shape[1] // 2, *x.shape[2:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype).to(x.device)


def run(fn, x, weight, bias, grad_out):
    """(out, grad x, grad weight, grad bias or None) of ``fn`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    out = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, *grads, *((None,) if bias is None else ())


def triton_public(x, weight, bias):
    return dwconv_gelu_gate(x, weight, bias, backend="triton")


def assert_matches_reference(inputs, atol, rtol, fn=triton_public):
    x, weight, bias = inputs
    grad_out = grad_output(x)
    got = run(fn, *inputs, grad_out)
    want = run(dwconv_gelu_gate_reference, *inputs, grad_out)
    out, grad_x, grad_w, grad_b = got
    assert out.dtype == x.dtype and out.shape == grad_out.shape and out.is_contiguous()
    assert grad_x.dtype == x.dtype and grad_x.shape == x.shape
    assert grad_w.dtype == weight.dtype and grad_w.shape == weight.shape
    terms = math.sqrt(max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    tolerances = ((atol, rtol), (atol, rtol), (atol * terms, rtol), (atol * terms, rtol))
    for name, a, b, (t_abs, t_rel) in zip(
        ("output", "grad x", "grad w", "grad b"), got, want, tolerances, strict=True
    ):
        if a is None:
            continue
        assert bool(a.isfinite().all()), f"{name} has NaN/Inf: a kernel read garbage or skipped an element"
        torch.testing.assert_close(a.double(), b.double(), atol=t_abs, rtol=t_rel, msg=name)


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The interpreter with the GPU's block sizes (it normally takes 8x more channels per program)."""
    monkeypatch.setattr(dw_triton, "_INTERPRETER_TILE_ELEMENTS", dw_triton._TILE_ELEMENTS)


@pytest.fixture
def one_channel_blocks(monkeypatch):
    """One channel per program, in the convolutions and in the weight-gradient reduction."""
    monkeypatch.setattr(dw_triton, "_INTERPRETER_TILE_ELEMENTS", 1)
    monkeypatch.setattr(dw_triton, "_TILE_ELEMENTS", 1)


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, atol, rtol):
    assert_matches_reference(make_inputs(*case, dtype=dtype), atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), HALF_DTYPES)
@pytest.mark.parametrize("case", HALF_CASES)
def test_matches_reference_half(case, dtype, atol, rtol):
    assert_matches_reference(make_inputs(*case, dtype=dtype), atol, rtol)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6]])
def test_without_bias(case):
    assert_matches_reference(make_inputs(*case, bias=False), *FP32_TOL)


@pytest.mark.parametrize(
    ("case", "blocks"),
    [
        # GPU blocks on 17 x 65: 2 gate channels per program, so Ch = 5 takes 3 blocks, the last
        # one half past the gate channels.
        pytest.param((1, 5, 17, 65, 3), "gpu_blocks", id="gpu-blocks-17x65"),
        pytest.param((2, 3, 5, 6, 5), "one_channel_blocks", id="one-channel"),
    ],
)
def test_channel_blocks_match_reference(case, blocks, request):
    request.getfixturevalue(blocks)
    assert dw_triton._blocks(case[1], case[2], case[3])["c_blocks"] > 1
    assert_matches_reference(make_inputs(*case), *FP32_TOL)


def test_large_inputs_stay_finite():
    # |a| up to ~40: Phi(a) * a and phi(a) saturate without overflow (exp(-a^2 / 2) -> 0).
    x, weight, bias = make_inputs(1, 2, 6, 7, 3)
    assert_matches_reference((20 * x, weight, bias), 1e-4, 1e-5)


def test_direct_call():
    assert_matches_reference(make_inputs(1, 2, 4, 5, 5), *FP32_TOL, fn=dwconv_gelu_gate_triton)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param("channels_last", id="channels-last"),
        pytest.param("sliced", id="sliced"),
        pytest.param("weight-transposed", id="weight-transposed"),
    ],
)
def test_non_contiguous_input(layout):
    x, weight, bias = make_inputs(1, 3, 5, 6, 3)
    x_in, w_in = x, weight
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        x_in = wide[..., ::2]
    else:
        w_in = weight.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (x_in.is_contiguous() and w_in.is_contiguous())
    torch.testing.assert_close(
        triton_public(x_in, w_in, bias), triton_public(x, weight, bias), atol=0, rtol=0
    )


# --- buffers, determinism -----------------------------------------------------------------------


def _fwd_bwd(x, weight, bias):
    y = torch.ops.moce_triton.dwconv_gelu_gate_fwd(x, weight, bias)
    return (y, *torch.ops.moce_triton.dwconv_gelu_gate_bwd(grad_output(x, seed=2), x, weight, bias))


@pytest.mark.parametrize(
    ("case", "bias"),
    [
        pytest.param((1, 3, 13, 21, 5), True, id="k5-13x21"),
        pytest.param((2, 2, 1, 1, 3), False, id="1x1-no-bias"),
        pytest.param((1, 5, 17, 65, 3), True, id="gpu-blocks-17x65"),
    ],
)
def test_every_element_is_written(case, bias, request):
    """With every torch.empty NaN-filled (outputs, the gradient of the convolution, the partial
    sums), the results are the same bits as with the normal buffers: every element written, no
    partial sum read that was not written."""
    if "gpu-blocks" in request.node.callspec.id:
        request.getfixturevalue("gpu_blocks")
    inputs = make_inputs(*case, bias=bias)
    want = _fwd_bwd(*inputs)
    request.getfixturevalue("nan_filled_empty")
    assert bool(torch.empty(3).isnan().all()), "the fixture must fill torch.empty with NaN"
    got = _fwd_bwd(*inputs)
    for name, a, b in zip(("y", "grad x", "grad w", "grad b"), got, want, strict=True):
        assert not bool(a.isnan().any()), f"{name}: an element was not written"
        assert torch.equal(a, b), name


def test_grad_bias_is_zero_without_bias():
    x, weight, _ = make_inputs(1, 2, 4, 5, 3)
    _, _, grad_b = torch.ops.moce_triton.dwconv_gelu_gate_bwd(grad_output(x), x, weight, None)
    assert grad_b.shape == (4,) and grad_b.dtype == weight.dtype
    assert torch.equal(grad_b, torch.zeros_like(grad_b))


def test_backward_is_deterministic(gpu_blocks):
    # Two images and 2 x 2 tiles per plane: the reduction sums B * tiles partial sums per channel.
    inputs = make_inputs(2, 2, 17, 65, 3, dtype=torch.bfloat16)
    grad_out = grad_output(inputs[0], seed=3)
    first = run(dwconv_gelu_gate_triton, *inputs, grad_out)
    second = run(dwconv_gelu_gate_triton, *inputs, grad_out)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# --- the ops: gradcheck, opcheck, torch.compile -------------------------------------------------


@pytest.mark.parametrize(
    ("case", "bias"),
    [
        pytest.param((2, 2, 3, 4, 3), True, id="k3-bias"),
        pytest.param((1, 1, 4, 3, 5), False, id="k5-no-bias"),
    ],
)
def test_gradcheck(case, bias):
    x, weight, b = make_inputs(*case, dtype=torch.float64, bias=bias)
    leaves = [t.requires_grad_(True) for t in (x, weight, b) if t is not None]

    def fn(*args):
        return dwconv_gelu_gate_triton(args[0], args[1], args[2] if bias else None)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize(
    ("dtype", "requires_grad", "bias"),
    [
        pytest.param(torch.float32, True, True, id="fp32-grad"),
        pytest.param(torch.float32, True, False, id="fp32-grad-no-bias"),
        pytest.param(torch.bfloat16, False, True, id="bf16"),
    ],
)
def test_opcheck(dtype, requires_grad, bias):
    # Every default opcheck sub-test (test_schema, test_autograd_registration, test_faketensor,
    # test_aot_dispatch_dynamic) passes under the interpreter: the ops are custom_op + register_fake.
    x, weight, b = make_inputs(1, 2, 3, 4, 3, dtype=dtype, bias=bias)
    args = tuple(None if t is None else t.requires_grad_(requires_grad) for t in (x, weight, b))
    torch.library.opcheck(torch.ops.moce_triton.dwconv_gelu_gate_fwd.default, args)
    bwd_args = (grad_output(x), x.detach(), weight.detach(), None if b is None else b.detach())
    torch.library.opcheck(torch.ops.moce_triton.dwconv_gelu_gate_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    leaves = [t.requires_grad_(True) for t in make_inputs(1, 2, 4, 5, 3)]
    compiled = torch.compile(dwconv_gelu_gate_triton, backend="aot_eager", fullgraph=True)
    out, want = compiled(*leaves), dwconv_gelu_gate_triton(*leaves)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_double_backward_raises():
    x, weight, bias = make_inputs(1, 1, 3, 3, 3, dtype=torch.float64)
    x.requires_grad_(True)
    out = dwconv_gelu_gate_triton(x, weight, bias)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "match"),
    [
        pytest.param((1, 5, 3, 3), (5, 3, 3), "x must be", id="odd-channels"),
        pytest.param((1, 4, 3, 3), (4, 11, 11), "weight must be", id="k11"),
        pytest.param((1, 4, 3, 3), (2, 3, 3), "weight must be", id="weight-channels"),
    ],
)
def test_launcher_rejects_what_the_kernels_cannot_take(x_shape, w_shape, match):
    # The op's own checks come first in dwconv_gelu_gate; these guard direct calls of the ops.
    with pytest.raises(ValueError, match=match):
        torch.ops.moce_triton.dwconv_gelu_gate_fwd(
            torch.randn(x_shape, device=DEVICE), torch.randn(w_shape, device=DEVICE), None
        )


def test_registration_survives_reimport():
    module = importlib.reload(gate_triton)  # would raise if the ops were defined twice
    assert_matches_reference(make_inputs(1, 2, 3, 4, 3), *FP32_TOL, fn=module.dwconv_gelu_gate_triton)


def test_module_exports_the_convention_name():
    assert _backend.implementation("dwconv_gelu_gate", "triton").__name__ == "dwconv_gelu_gate_triton"


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [DTYPES[0], HALF_DTYPES[0]])
def test_gpu_moce_ir_s_gdfn_shapes(dtype, atol, rtol):
    # MoCE-IR-S (dim 32, ffn_expansion 2): the GDFN at full resolution (Ch = 64, 128 x 128) and
    # at level 2 (Ch = 128, 64 x 64), batch 8.
    for gate, side in ((64, 128), (128, 64)):
        assert_matches_reference(make_inputs(8, gate, side, side, 3, dtype=dtype), atol, rtol)


# --- ahead-of-time compile for sm_90 ------------------------------------------------------------

#: Compiles the two gate kernels for sm_90 with the block sizes and warps the launchers pick on a
#: GPU (``_gate_blocks`` without the interpreter) and prints one JSON line per kernel with its resource
#: usage (``cuobjdump -res-usage``: registers, stack and local memory, where spills go). grad x and
#: the reduction run grouped_dwconv's kernels, compiled by its own test. Exits 3 without Triton's
#: ahead-of-time API (the test skips).
AOT_BODY = """
    from moce_kernels.dwconv_gelu_gate import triton as gate
    from moce_kernels.grouped_dwconv import triton as dw

    ints = dict.fromkeys(("CH", "H", "W", "c_blocks", "tiles_w", "tiles"), "i32")
    # MoCE-IR-S's GDFN (3x3; Ch = 64 at 128 x 128) in bf16, fp16, fp32 and fp64 (gradcheck), and
    # the largest kernels, 7x7 without bias and 9x9.
    for label, t, side, k, has_bias in (
        ("bf16-k3", "*bf16", 128, 3, True),
        ("fp16-k3", "*fp16", 128, 3, True),
        ("fp32-k3", "*fp32", 128, 3, True),
        ("fp64-k3", "*fp64", 16, 3, True),
        ("bf16-k7-no-bias", "*bf16", 128, 7, False),
        ("fp32-k9", "*fp32", 128, 9, True),
    ):
        b = gate._gate_blocks(64, side, side)
        acc = "*fp64" if t == "*fp64" else "*fp32"
        consts = dict(K=k, HAS_BIAS=has_bias, BLOCK_C=b["block_c"], BLOCK_H=b["block_h"],
                      BLOCK_W=b["block_w"], ACC=tl.float64 if t == "*fp64" else tl.float32)
        fwd = dict(x_ptr=t, w_ptr=t, b_ptr=t, y_ptr=t, **ints)
        compile_("fwd-" + label, gate.dwconv_gelu_gate_fwd_kernel, fwd, consts, dw._CONV_WARPS)
        bwd = dict(x_ptr=t, w_ptr=t, b_ptr=t, gy_ptr=t, gc_ptr=acc, part_w_ptr=acc, part_b_ptr=acc, **ints)
        compile_("bwd-gate-" + label, gate.dwconv_gelu_gate_bwd_gate_kernel, bwd, consts, dw._CONV_WARPS)
    """


def test_aot_compile_sm90():
    """Compile the gate kernels for sm_90 (Triton's own compiler and ptxas, no GPU needed): catches
    what the interpreter forgives (constexpr misuse, dtype mismatches, erf on half types), and
    checks that none spills. Runs in a subprocess without TRITON_INTERPRET. Prints the registers
    per thread (``pytest -s``)."""
    results = aot_resource_usage(AOT_BODY)
    assert len(results) == 12
    for r in results:
        print(r)
        if "STACK" in r:
            assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{r['label']} spills: {r}"
