"""layernorm2d on the Triton kernels: the interpreter on the CPU here, the GPU when there is one.

Forward and the three gradients against ``layernorm2d_reference`` (through the public function with
``backend="triton"``, so the plumbing runs too), both kernel paths (the [C, BLOCK_P] tile held in
registers, and the chunked loop over C for wide C), mixed parameter dtypes, NaN-filled buffers,
determinism, gradcheck, ``opcheck`` of ``torch.ops.moce_triton.layernorm2d_fwd`` / ``_bwd``,
torch.compile, and an ahead-of-time compile of every kernel for sm_90.
"""

from __future__ import annotations

import functools
import importlib
import math
import textwrap

import pytest
import torch

from moce_kernels import layernorm2d
from tests.ops._helpers import (
    AOT_PRELUDE,
    LAYERNORM_DTYPES,
    LAYOUTS,
    TRITON_DEVICE,
    check_layernorm2d,
    layernorm2d_reference_quiet,
    layernorm_inputs,
    misaligned,
    nan_empty,
    run_aot_script,
    skip_unless_triton_usable,
)

skip_unless_triton_usable()

# Imported by path: ``moce_kernels.layernorm2d`` the attribute is the function, not the package.
ln_triton = importlib.import_module("moce_kernels.layernorm2d.triton")
layernorm2d_triton = ln_triton.layernorm2d_triton

#: The interpreter runs on CPU tensors; compiled Triton needs CUDA tensors.
DEVICE = TRITON_DEVICE

SHAPES = [
    pytest.param((1, 3, 13, 21), id="B1-C3-13x21"),
    pytest.param((2, 48, 7, 5), id="C48-7x5"),
    pytest.param((3, 1, 1, 1), id="C1-1x1"),
    # C not a power of two: a masked [256, BLOCK_P] tile.
    pytest.param((2, 130, 4, 9), id="C130"),
    # C > _SINGLE_TILE_MAX_C: the chunked loop over C, last chunk partial (600 = 9 * 64 + 24).
    pytest.param((1, 600, 3, 5), id="C600-loop"),
    # Several pixel tiles per image (BLOCK_P = 256 under the interpreter, 32 on a GPU).
    pytest.param((2, 40, 17, 19), id="C40-17x19-tiles"),
    pytest.param((0, 4, 5, 6), id="B0"),
    pytest.param((2, 3, 0, 5), id="HW0"),
]

# (dtype, atol, rtol): atol scaled per pixel by max(1, rstd) (and its square for grad x) and for
# the parameter gradients by sqrt(pixels) (see check_against_reference).
DTYPES = LAYERNORM_DTYPES


#: (atol, rtol) of one rounding to each dtype, for gradients stored in a parameter's own dtype.
ROUNDING = {param.values[0]: param.values[1:] for param in DTYPES}


make_inputs = functools.partial(layernorm_inputs, device=DEVICE)


reference = layernorm2d_reference_quiet


def check_against_reference(x, weight, bias, eps, atol, rtol, fn=None):
    """Output and grads of x, weight, bias of ``fn`` (default: the public function, backend
    "triton") against the reference; the parameter gradients are rounded to the parameters' own
    dtype (the looser of its tolerance and x's)."""
    fn = fn or (lambda a, w, b, e: layernorm2d(a, w, b, e, backend="triton"))
    check_layernorm2d(fn, x, weight, bias, eps, atol, rtol, param_rounding=ROUNDING)


@pytest.fixture
def loop_path(monkeypatch):
    """Force the chunked loop over C with 16-channel chunks (normally only for C > 512)."""
    monkeypatch.setattr(ln_triton, "_SINGLE_TILE_MAX_C", 8)
    monkeypatch.setattr(ln_triton, "_LOOP_BLOCK_C", 16)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The interpreter with the GPU's tile sizes (it normally takes 8x larger tiles)."""
    monkeypatch.setattr(ln_triton, "_INTERPRETER_TILE_ELEMENTS", ln_triton._TILE_ELEMENTS)


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element a kernel skips shows up."""
    monkeypatch.setattr(ln_triton, "_empty", nan_empty)


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, atol, rtol):
    check_against_reference(*make_inputs(shape, dtype), 1e-5, atol, rtol)


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [
        pytest.param(torch.float32, 1e-5, 1.3e-5, id="fp32"),
        pytest.param(torch.bfloat16, 2e-2, 1.6e-2, id="bf16"),
    ],
)
@pytest.mark.parametrize(
    "shape", [pytest.param((2, 37, 5, 7), id="C37"), pytest.param((1, 48, 3, 3), id="C48")]
)
def test_loop_over_channels_matches_reference(shape, dtype, atol, rtol, loop_path):
    assert not ln_triton._blocks(shape[1], shape[2] * shape[3])[2]  # the loop path is taken
    check_against_reference(*make_inputs(shape, dtype), 1e-5, atol, rtol)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 24, 9, 17), id="C24-9x17"),
        pytest.param((1, 130, 5, 7), id="C130"),
        pytest.param((1, 600, 3, 5), id="C600-loop"),
    ],
)
def test_gpu_tile_sizes_match_reference(shape, gpu_tiles):
    check_against_reference(*make_inputs(shape, torch.float32), 1e-5, 1e-5, 1.3e-5)


@pytest.mark.parametrize(
    ("dtype", "param_dtype"),
    [
        # The model: LayerNorm of float32 activations with bf16 weights, and under autocast of
        # bf16 / fp16 activations with float32 weights.
        pytest.param(torch.float32, torch.bfloat16, id="fp32-x-bf16-params"),
        pytest.param(torch.bfloat16, torch.float32, id="bf16-x-fp32-params"),
        pytest.param(torch.float16, torch.float32, id="fp16-x-fp32-params"),
    ],
)
def test_params_in_another_dtype(dtype, param_dtype):
    x, weight, bias = make_inputs((2, 6, 9, 11), dtype, param_dtype=param_dtype)
    atol, rtol = (1e-5, 1.3e-5) if dtype == torch.float32 else (2e-2, 1.6e-2)
    check_against_reference(x, weight, bias, 1e-5, atol, rtol)


@pytest.mark.parametrize("eps", [pytest.param(1e-6, id="eps1e-6"), pytest.param(1e-2, id="eps1e-2")])
def test_other_eps(eps):
    # Few channels and a small spread make eps matter.
    x, weight, bias = make_inputs((2, 3, 5, 7), torch.float32)
    check_against_reference(x * 0.05, weight, bias, eps, 1e-5, 1.3e-5)


@pytest.mark.parametrize("path", [pytest.param("tile", id="tile"), pytest.param("loop", id="loop")])
def test_large_mean_small_spread(path, request):
    # |mean| = 300 >> std = 0.02: E[x^2] - E[x]^2 in float32 would lose every digit of the variance.
    # Against float64 statistics of the same float32 values.
    if path == "loop":
        request.getfixturevalue("loop_path")
    g = torch.Generator().manual_seed(5)
    x = (300 + 0.02 * torch.randn(2, 40, 3, 4, generator=g)).to(DEVICE)
    weight, bias = torch.ones(40, device=DEVICE), torch.zeros(40, device=DEVICE)
    y, mean, rstd = torch.ops.moce_triton.layernorm2d_fwd(x, weight, bias, 1e-5)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(1), atol=3.1e-5, rtol=0)  # a float32 ulp at 300
    torch.testing.assert_close(rstd.double(), (xd.var(1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-4)
    torch.testing.assert_close(
        y.double(), reference(xd, weight.double(), bias.double(), 1e-5), atol=5e-3, rtol=0
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_or_misaligned_input(layout):
    x, weight, bias = make_inputs((2, 5, 6, 8), torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, 1:-1, ::2]
    else:
        x = misaligned(x)
    check_against_reference(x, weight, bias, 1e-5, 1e-5, 1.3e-5)


def test_direct_call_matches_public_function():
    x, weight, bias = make_inputs((2, 7, 5, 3), torch.float32)
    want = layernorm2d(x, weight, bias, backend="triton")
    torch.testing.assert_close(layernorm2d_triton(x, weight, bias, 1e-5), want, atol=0, rtol=0)


def test_nan_stays_in_its_pixel():
    x, weight, bias = make_inputs((2, 4, 5, 8), torch.float32)
    x[1, 2, 3, 4] = math.nan
    out = layernorm2d_triton(x, weight, bias, 1e-5).cpu()
    nan_mask = torch.zeros(out.shape, dtype=torch.bool)
    nan_mask[1, :, 3, 4] = True
    assert bool(out[nan_mask].isnan().all())
    assert bool(out[~nan_mask].isfinite().all())


def test_constant_pixel_gives_bias():
    x = torch.full((1, 4, 2, 3), 3.25, device=DEVICE)
    weight, bias = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    out = layernorm2d_triton(x, weight, bias, 1e-5)
    torch.testing.assert_close(out, bias.view(1, 4, 1, 1).expand_as(x), atol=0, rtol=0)


# --- buffers, determinism -----------------------------------------------------------------------


def _fwd_bwd(x, weight, bias):
    y, mean, rstd = torch.ops.moce_triton.layernorm2d_fwd(x, weight, bias, 1e-5)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype).to(x.device)
    return (y, mean, rstd, *torch.ops.moce_triton.layernorm2d_bwd(grad_y, x, weight, mean, rstd))


@pytest.mark.parametrize(
    ("shape", "path"),
    [
        pytest.param((2, 40, 17, 19), "tile", id="tile-C40-17x19"),
        pytest.param((2, 24, 9, 17), "gpu-tiles", id="gpu-tiles-C24-9x17"),
        pytest.param((3, 5, 1, 1), "tile", id="tile-1x1"),
        pytest.param((2, 37, 5, 7), "loop", id="loop-C37"),
    ],
)
def test_every_element_is_written(shape, path, request):
    """With NaN-filled y, mean, rstd, grad x, partial sums and grad params, the results are the
    same bits as with the normal buffers (nothing left unwritten, nothing read before written)."""
    if path == "loop":
        request.getfixturevalue("loop_path")
    if path == "gpu-tiles":
        request.getfixturevalue("gpu_tiles")
    x, weight, bias = make_inputs(shape, torch.float32)
    want = _fwd_bwd(x, weight, bias)
    request.getfixturevalue("nan_buffers")
    got = _fwd_bwd(x, weight, bias)
    for name, a, b in zip(("y", "mean", "rstd", "grad x", "grad w", "grad b"), got, want, strict=True):
        assert not bool(a.isnan().any()), f"{name}: an element was not written"
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_backward_is_deterministic(dtype, gpu_tiles):
    # 4 pixel tiles per image: 12 partial sums per channel.
    x, weight, bias = make_inputs((3, 24, 11, 23), dtype)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)

    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
        return torch.autograd.grad(layernorm2d_triton(*leaves, 1e-5), leaves, grad_out)

    first, second = grads(), grads()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_empty_input_gives_zero_param_grads():
    for shape in ((0, 3, 4, 5), (2, 3, 0, 4)):
        x, weight, bias = (t.requires_grad_(True) for t in make_inputs(shape, torch.float32))
        out = layernorm2d_triton(x, weight, bias, 1e-5)
        assert out.shape == shape
        grad_x, grad_w, grad_b = torch.autograd.grad(out.sum(), (x, weight, bias))
        assert grad_x.shape == shape
        torch.testing.assert_close(grad_w, torch.zeros_like(weight), atol=0, rtol=0)
        torch.testing.assert_close(grad_b, torch.zeros_like(bias), atol=0, rtol=0)


# --- the ops: statistics, gradcheck, opcheck, torch.compile ------------------------------------


@pytest.mark.parametrize(
    ("dtype", "stats_dtype"),
    [
        pytest.param(torch.float32, torch.float32, id="fp32"),
        pytest.param(torch.float64, torch.float64, id="fp64"),
        pytest.param(torch.bfloat16, torch.float32, id="bf16"),
    ],
)
def test_fwd_op_statistics(dtype, stats_dtype):
    x, weight, bias = make_inputs((2, 9, 5, 7), dtype)
    y, mean, rstd = torch.ops.moce_triton.layernorm2d_fwd(x, weight, bias, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert mean.shape == rstd.shape == (2, 5, 7)
    assert mean.dtype == rstd.dtype == stats_dtype
    xs = x.to(stats_dtype)
    tol = 1e-12 if stats_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean, xs.mean(1), atol=tol, rtol=tol)
    torch.testing.assert_close(rstd, (xs.var(1, unbiased=False) + 1e-5).rsqrt(), atol=tol, rtol=tol)


def test_bwd_op_output_dtypes():
    x, weight, _ = make_inputs((2, 6, 3, 5), torch.bfloat16, param_dtype=torch.float32)
    _, mean, rstd = torch.ops.moce_triton.layernorm2d_fwd(x, weight, weight, 1e-5)
    grad_x, grad_w, grad_b = torch.ops.moce_triton.layernorm2d_bwd(torch.ones_like(x), x, weight, mean, rstd)
    assert grad_x.dtype == torch.bfloat16 and grad_x.shape == x.shape
    assert grad_w.dtype == grad_b.dtype == torch.float32 and grad_w.shape == grad_b.shape == (6,)
    # grad bias is the sum of grad y over batch and pixels.
    torch.testing.assert_close(grad_b, torch.full_like(grad_b, 2 * 3 * 5), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("shape", "path", "fast"),
    [
        pytest.param((1, 3, 2, 3), "tile", False, id="1x3x2x3"),
        pytest.param((2, 1, 2, 2), "tile", False, id="C1"),
        pytest.param((2, 5, 4, 5), "tile", True, id="2x5x4x5-fast"),
        pytest.param((1, 20, 2, 3), "loop", True, id="loop-C20-fast"),
    ],
)
def test_gradcheck(shape, path, fast, request):
    if path == "loop":
        request.getfixturevalue("loop_path")
    x, weight, bias = (t.requires_grad_(True) for t in make_inputs(shape, torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, w, b: layernorm2d_triton(a, w, b, 1e-5), (x, weight, bias), fast_mode=fast
    )


@pytest.mark.parametrize(
    ("dtype", "requires_grad"),
    [
        pytest.param(torch.float32, True, id="fp32-grad"),
        pytest.param(torch.float64, True, id="fp64-grad"),
        pytest.param(torch.bfloat16, False, id="bf16"),
    ],
)
def test_opcheck(dtype, requires_grad):
    # Every default opcheck sub-test (test_schema, test_autograd_registration, test_faketensor,
    # test_aot_dispatch_dynamic) passes under the interpreter: the ops are custom_op + register_fake.
    x, weight, bias = make_inputs((2, 6, 5, 8), dtype)
    args = [t.requires_grad_(requires_grad) for t in (x, weight, bias)]
    torch.library.opcheck(torch.ops.moce_triton.layernorm2d_fwd.default, (*args, 1e-5))
    y, mean, rstd = torch.ops.moce_triton.layernorm2d_fwd(x.detach(), weight.detach(), bias.detach(), 1e-5)
    grad_y = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.moce_triton.layernorm2d_bwd.default, (grad_y, x.detach(), weight.detach(), mean, rstd)
    )


def test_torch_compile_fullgraph():
    x, weight, bias = (t.requires_grad_(True) for t in make_inputs((2, 5, 4, 6), torch.float32))
    compiled = torch.compile(
        lambda a, w, b: layernorm2d_triton(a, w, b, 1e-5), backend="aot_eager", fullgraph=True
    )
    out = compiled(x, weight, bias)
    want = layernorm2d_triton(x, weight, bias, 1e-5)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    want_grads = torch.autograd.grad(want.square().sum(), (x, weight, bias))
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_double_backward_raises():
    x, weight, bias = (t.requires_grad_(True) for t in make_inputs((1, 3, 2, 2), torch.float64))
    out = layernorm2d_triton(x, weight, bias, 1e-5)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


def test_registration_survives_reimport():
    importlib.reload(ln_triton)  # would raise if the ops were defined twice
    x, weight, bias = make_inputs((1, 3, 2, 2), torch.float32)
    want = reference(x, weight, bias, 1e-5)
    torch.testing.assert_close(
        ln_triton.layernorm2d_triton(x, weight, bias, 1e-5), want, atol=1e-5, rtol=1e-5
    )


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "shape", [pytest.param((8, 32, 128, 128), id="s-level0"), pytest.param((8, 384, 16, 16), id="latent")]
)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [DTYPES[0], DTYPES[2]])
def test_gpu_model_shapes(shape, dtype, atol, rtol):
    # MoCE-IR-S training crops (level 0) and MoCE-IR's latent width (C = 384, 16 warps).
    check_against_reference(*make_inputs(shape, dtype), 1e-5, atol, rtol)


# --- ahead-of-time compile for sm_90 ------------------------------------------------------------

AOT_SCRIPT = AOT_PRELUDE + textwrap.dedent(
    """
    from moce_kernels.layernorm2d import triton as ln

    fwd = dict(x_ptr="*bf16", w_ptr="*fp32", b_ptr="*fp32", y_ptr="*bf16", mean_ptr="*fp32",
               rstd_ptr="*fp32", C="i32", HW="i32", TILES="i32", eps="fp32")
    bwd = dict(gy_ptr="*bf16", x_ptr="*bf16", w_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
               gx_ptr="*bf16", part_w_ptr="*fp32", part_b_ptr="*fp32", C="i32", HW="i32",
               TILES="i32")
    for c, p in ((48, 16 * 16), (384, 16 * 16), (600, 32 * 32)):
        block_c, block_p, single, warps = ln._blocks(c, p)
        consts = dict(BLOCK_C=block_c, BLOCK_P=block_p, SINGLE_TILE=single, ACC=tl.float32)
        compile_(ln.layernorm2d_fwd_kernel, fwd, consts, warps)
        compile_(ln.layernorm2d_bwd_kernel, bwd, consts, warps)
    fwd64 = {k: ("*fp64" if v.startswith("*") else v) for k, v in fwd.items()}
    consts64 = dict(BLOCK_C=64, BLOCK_P=32, SINGLE_TILE=False, ACC=tl.float64)
    compile_(ln.layernorm2d_fwd_kernel, fwd64, consts64, 4)
    compile_(ln.layernorm2d_reduce_kernel, dict(part_ptr="*fp32", out_ptr="*bf16", R="i32", C="i32"),
             dict(BLOCK_R=32, BLOCK_C=64, ACC=tl.float32), 4)
    """
)


def test_aot_compile_sm90():
    """Compile every kernel for sm_90 (Triton's own compiler, no GPU needed): catches what the
    interpreter forgives (constexpr misuse, dtype mismatches in loops and branches). Runs in a
    subprocess without TRITON_INTERPRET, which swaps Triton's own jit helpers for interpreted ones."""
    assert run_aot_script(AOT_SCRIPT).count("compiled") == 8
