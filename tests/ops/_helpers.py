"""Helpers shared by the op tests (tests/ops): module skips, devices, routing plans, buffers that
show unwritten elements, the ahead-of-time sm_90 compile, layernorm2d inputs and tolerances.

Fixtures built on them (``nan_filled_empty``, ``sm90_results``) live in tests/ops/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

from moce_kernels import _backend, _extension
from moce_kernels.layernorm2d.reference import layernorm2d_reference
from moce_kernels.route.reference import RoutingPlan
from tests.conftest import make_routing_impl

#: The repository root (the child processes run there, with it on PYTHONPATH).
ROOT = Path(__file__).resolve().parents[2]

# --- module-level skips ---------------------------------------------------------------------------


def skip_unless_extension_built() -> None:
    """Skip the calling test module when moce_kernels._C (the CPU kernels) is not built."""
    if not _extension.is_built("cpu"):
        pytest.skip(f"{_extension.build_summary()}; {_extension.BUILD_HINT}", allow_module_level=True)


def skip_unless_triton_usable() -> None:
    """Skip the calling test module when Triton cannot run here (no GPU and no interpreter)."""
    usable, why = _backend.triton_usable()
    if not usable:
        pytest.skip(f"Triton cannot run here: {why}", allow_module_level=True)


# --- devices --------------------------------------------------------------------------------------

#: Marks of a test of the compiled CUDA kernels.
NEEDS_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not _extension.is_built("cuda"),
        reason="moce_kernels._C was built without the CUDA kernels",
    ),
]

#: The compiled kernels' devices (also their backend names).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=NEEDS_CUDA)]

#: Where the Triton kernels run here: CUDA when present, else the CPU interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Input layouts the kernels must take (non-contiguous ones are copied, misaligned ones read).
LAYOUTS = [
    pytest.param("channels_last", id="channels-last"),
    pytest.param("sliced", id="sliced"),
    # Contiguous, but starting one element into its buffer: not 16-byte aligned.
    pytest.param("misaligned", id="misaligned"),
]


# --- comparisons ----------------------------------------------------------------------------------


def assert_close_rel(got, want, rtol, name):
    """|got - want| <= rtol * max|want| (+ a tiny floor for all-zero results), same dtype."""
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert not bool(got.isnan().any()), f"{name}: NaN"
    scale = want.double().abs().max().item() if want.numel() else 0.0
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale + 1e-6, f"{name}: max error {err:.3g} against max |want| {scale:.3g}"


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x that starts one element into its buffer (not 16-byte aligned)."""
    x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    return x


# --- routing plans --------------------------------------------------------------------------------

#: (E, k) for E in {1, 4, 5, 8} and k = 1..E.
EK_CASES = [pytest.param(e, k, id=f"E{e}-k{k}") for e in (1, 4, 5, 8) for k in range(1, e + 1)]
PATTERNS = [pytest.param(p, id=p) for p in ("random", "one_expert", "some_empty")]

#: (B, E, k, pattern): k = 1..E, empty experts, every image on one expert, B = 1.
ROUTINGS = [
    pytest.param(1, 4, 1, "random", id="B1-E4-k1"),
    pytest.param(5, 4, 2, "random", id="B5-E4-k2"),
    pytest.param(5, 5, 5, "random", id="B5-E5-k5"),
    pytest.param(6, 4, 1, "one_expert", id="B6-E4-k1-one-expert"),
    pytest.param(7, 5, 3, "some_empty", id="B7-E5-k3-some-empty"),
]

#: Trailing shapes of the rows.
FEATURES = [
    pytest.param((3, 13, 21), id="3x13x21"),
    # 8 features: the CUDA kernels take their 128-bit path for every dtype.
    pytest.param((2, 2, 2), id="2x2x2-vec"),
    pytest.param((), id="1d"),
]


def plan_on(batch, num_experts, k, pattern, device, seed=0):
    """The plan of ``make_routing_impl(batch, num_experts, k, pattern, seed=seed)`` on ``device``."""
    _, plan = make_routing_impl(batch, num_experts, k, pattern, seed=seed)
    return type(plan)(*(t.to(device) for t in plan))


def plan_on_device(plan: RoutingPlan, device: str = TRITON_DEVICE) -> RoutingPlan:
    """``plan`` detached, on ``device`` (default: where the Triton kernels run)."""
    return RoutingPlan(*(t.detach().to(device) for t in plan))


@st.composite
def routed_images(draw):
    """A routing (batch, num_experts, k, pattern, seed) of images of height x width (hypothesis)."""
    num_experts = draw(st.integers(1, 6))
    return dict(
        batch=draw(st.integers(1, 6)),
        num_experts=num_experts,
        k=draw(st.integers(1, num_experts)),
        pattern=draw(st.sampled_from(["random", "one_expert", "some_empty"])),
        height=draw(st.integers(1, 9)),
        width=draw(st.integers(1, 9)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# --- buffers that show an element a kernel forgot to write --------------------------------------

#: What ``prefilled_buffers`` writes into fresh integer buffers (no plan index can equal it).
INT_SENTINEL = -(2**40)


@contextlib.contextmanager
def prefilled_buffers(monkeypatch):
    """Inside the block, ``torch.empty`` / ``empty_like`` / ``new_empty`` return buffers filled
    with NaN (floating dtypes) or ``INT_SENTINEL`` (integer dtypes), so an element a kernel
    forgets to write shows up in the result."""

    def fill(t):
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and t.element_size() >= 8:
            t.fill_(INT_SENTINEL)
        return t

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
        m.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
        m.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: fill(new_empty(self, *a, **kw)))
        yield


def assert_all_written(t: torch.Tensor, name: str) -> None:
    if t.dtype.is_floating_point:
        assert not bool(t.isnan().any()), f"{name}: NaN left (element not written)"
    elif t.dtype == torch.int64:
        assert not bool((t == INT_SENTINEL).any()), f"{name}: sentinel left (element not written)"


def nan_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A stand-in for a launcher's ``_empty(shape, dtype, device)``: the buffer starts as NaN."""
    return torch.full(shape, math.nan, dtype=dtype, device=device)


@contextlib.contextmanager
def nan_filled_torch_empty():
    """Inside the block every torch.empty (also those the kernels allocate) comes back NaN-filled
    (deterministic mode's ``fill_uninitialized_memory``)."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# --- ahead-of-time compile for sm_90 --------------------------------------------------------------


def run_without_interpreter(script: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -c script`` in the repository WITHOUT TRITON_INTERPRET: under the interpreter
    ``triton.jit`` returns interpreted functions, and the jit helpers of ``tl.sum`` /
    ``tl.cumsum`` then fail to compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", script],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )


#: The start of an ahead-of-time compile script for :func:`run_aot_script`: exits 3 without the
#: API; ``compile_(fn, signature, constexprs, num_warps)`` compiles one kernel for sm_90 and
#: prints "compiled".
AOT_PRELUDE = textwrap.dedent(
    """
    import sys
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"no AOT API: {e}")
        sys.exit(3)

    def compile_(fn, signature, constexprs, num_warps):
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        try:
            src = ASTSource(fn, sig, constexprs)
        except (TypeError, KeyError, AttributeError) as e:
            print(f"ASTSource API differs: {e!r}")
            sys.exit(3)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        print("compiled", fn.__name__, constexprs, num_warps)
    """
)


#: The start of a script for :func:`aot_resource_usage`: ``compile_(label, fn, signature,
#: constexprs, num_warps)`` compiles one kernel for sm_90 and prints ``AOT {json}`` with its label,
#: the matrix instructions of its PTX ("wgmma", "mma" or "fma") and ptxas' resource usage
#: (``cuobjdump -res-usage``: REG, STACK and LOCAL; STACK / LOCAL > 0 is where spills go).
AOT_USAGE_PRELUDE = textwrap.dedent(
    """
    import json, os, shutil, subprocess, sys, tempfile
    try:
        import torch
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"no AOT API: {e}")
        sys.exit(3)

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")

    def usage(cubin):
        if cuobjdump is None:
            return {}
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            text = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
        fields = [w.split(":") for w in text.split() if w.split(":")[0] in ("REG", "STACK", "LOCAL")]
        return {k: int(v) for k, v in fields}

    def compile_(label, fn, signature, constexprs, num_warps):
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        try:
            src = ASTSource(fn, sig, constexprs)
        except (TypeError, KeyError, AttributeError) as e:
            print(f"ASTSource API differs: {e!r}")
            sys.exit(3)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        ptx = kernel.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma"
        print("AOT " + json.dumps(dict(label=label, mma=mma, **usage(kernel.asm["cubin"]))), flush=True)
    """
)


def aot_resource_usage(body: str) -> list[dict]:
    """Run :data:`AOT_USAGE_PRELUDE` + ``body`` (which calls ``compile_``) without the interpreter;
    returns one dict per compiled kernel (label, mma, REG / STACK / LOCAL when cuobjdump exists).
    Skips the calling test without Triton's ahead-of-time API."""
    out = run_aot_script(AOT_USAGE_PRELUDE + textwrap.dedent(body))
    return [json.loads(line.removeprefix("AOT ")) for line in out.splitlines() if line.startswith("AOT ")]


def run_aot_script(script: str) -> str:
    """Run an :data:`AOT_PRELUDE` script (see :func:`run_without_interpreter`); returns its stdout.

    Skips the calling test when this Triton has no ahead-of-time compile API; fails when the
    script does.
    """
    done = run_without_interpreter(script)
    if done.returncode == 3:
        pytest.skip(f"Triton's ahead-of-time compile API is not available here: {done.stdout.strip()}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


_SPECS_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    results = {}
    for label, module, name, signature, constexprs in json.loads(sys.stdin.read()):
        fn = getattr(importlib.import_module(module), name)
        constexprs = {
            k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
            for k, v in constexprs.items()
        }
        try:
            src = triton.compiler.ASTSource(fn, signature, constexprs)
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
            results[label] = dict(ok=True, asm=sorted(kernel.asm))
        except Exception as exc:  # reported per kernel by the test
            results[label] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[-3000:])
    print("AOT-RESULTS " + json.dumps(results))
    """
)


def compile_for_sm90(specs: list[tuple]) -> dict[str, dict]:
    """Compile Triton kernels ahead of time for sm_90 (no GPU needed) to catch what the
    interpreter forgives (types, layouts, unsupported ops).

    ``specs``: (label, module, kernel name, signature {arg: "*fp32" | "i32" | "constexpr"},
    constexprs {arg: value, "tl.float32" for a dtype}). Runs in a fresh interpreter without
    TRITON_INTERPRET (:func:`run_without_interpreter`). Skips the calling test when this Triton
    has no ahead-of-time API or no CUDA backend.
    """
    try:
        import triton  # noqa: PLC0415
        from triton.backends.compiler import GPUTarget  # noqa: F401, PLC0415

        triton.compiler.ASTSource  # noqa: B018
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"no Triton ahead-of-time compile API: {exc}")
    proc = run_without_interpreter(_SPECS_SCRIPT, stdin=json.dumps(specs))
    for line in proc.stdout.splitlines():
        if line.startswith("AOT-RESULTS "):
            return json.loads(line.removeprefix("AOT-RESULTS "))
    if "backend" in proc.stderr.lower() and "cuda" in proc.stderr.lower():
        pytest.skip(f"Triton cannot target CUDA here: {proc.stderr[-500:]}")
    raise AssertionError(f"ahead-of-time compile script failed:\n{proc.stderr[-3000:]}")


def sm90_labels(specs: list[tuple]) -> list:
    """The parameters of ``test_kernels_compile_for_sm90``: one per spec, by label."""
    return [pytest.param(spec[0], id=spec[0]) for spec in specs]


def assert_compiled_for_sm90(result: dict) -> None:
    """One :func:`compile_for_sm90` result: compiled, through ptxas."""
    assert result["ok"], result.get("error")
    assert "cubin" in result["asm"], "compiled to PTX but not through ptxas"


# --- layernorm2d ----------------------------------------------------------------------------------

#: (dtype, atol, rtol) of the compiled and Triton kernels against the reference.
LAYERNORM_DTYPES = [
    pytest.param(torch.float32, 1e-5, 1.3e-5, id="fp32"),
    pytest.param(torch.float64, 1e-10, 1e-10, id="fp64"),
    # One rounding of the float32 result to bf16 / fp16 (eps 7.8e-3 / 9.8e-4), values O(1..10).
    pytest.param(torch.bfloat16, 2e-2, 1.6e-2, id="bf16"),
    pytest.param(torch.float16, 4e-3, 2e-3, id="fp16"),
]


def layernorm_inputs(shape, dtype, device="cpu", *, seed=0, param_dtype=None):
    """x [B, C, H, W] O(1..4) in ``dtype``, weight ~ 1 and bias ~ 0 [C] in ``param_dtype`` (x's)."""
    g = torch.Generator().manual_seed(seed)
    channels = shape[1]
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    weight = (1 + 0.5 * torch.randn(channels, generator=g)).to(param_dtype)
    bias = (0.5 * torch.randn(channels, generator=g)).to(param_dtype)
    return x.to(device), weight.to(device), bias.to(device)


def layernorm2d_reference_quiet(x, weight, bias, eps):
    """``layernorm2d_reference`` without torch.var's warning on an empty reduction (B = 0 or
    H * W = 0; the result is empty anyway)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="var\\(\\): degrees of freedom")
        return layernorm2d_reference(x, weight, bias, eps)


def check_layernorm2d(fn, x, weight, bias, eps, atol, rtol, *, param_rounding=None):
    """Output and the gradients of x, weight and bias of ``fn(x, weight, bias, eps)`` against
    ``layernorm2d_reference``.

    Both sides round in float32 (float64 for float64 input); rstd amplifies that rounding in the
    output and rstd**2 in grad x (pixels whose channels nearly agree), so atol is scaled per
    pixel by max(1, rstd) and its square; grad weight and grad bias sum over B * H * W pixels,
    so theirs grows with the square root of that. ``param_rounding`` ({dtype: (atol, rtol)}):
    each gradient is rounded to its leaf's own dtype, so its tolerance is the looser of that
    dtype's and (atol, rtol).
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    out = fn(*leaves, eps)
    want = layernorm2d_reference_quiet(*ref_leaves, eps)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    # Every element written: finite input gives finite output.
    assert bool(out.isfinite().all()), "output has NaN/Inf for finite input"
    acc = torch.float64
    xa = x.to(acc)
    rstd = ((xa - xa.mean(1, keepdim=True)).square().mean(1, keepdim=True) + eps).rsqrt().clamp(min=1)
    assert_close_scaled(out.to(acc), want.detach().to(acc), atol, rtol, rstd, "output")

    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(x.device)
    grads = torch.autograd.grad(out, leaves, grad_out)
    want_grads = torch.autograd.grad(want, ref_leaves, grad_out)
    root_pixels = math.sqrt(max(1, x.shape[0] * x.shape[2] * x.shape[3]))
    for name, leaf, got, ref, scale in zip(
        ("x", "weight", "bias"), leaves, grads, want_grads, (rstd**2, root_pixels, root_pixels), strict=True
    ):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        assert bool(got.isfinite().all()), f"grad {name} has NaN/Inf"
        leaf_atol, leaf_rtol = atol, rtol
        if param_rounding is not None:
            leaf_atol, leaf_rtol = (
                max(a, b) for a, b in zip((atol, rtol), param_rounding[leaf.dtype], strict=True)
            )
        assert_close_scaled(got.to(acc), ref.to(acc), leaf_atol, leaf_rtol, scale, f"grad {name}")


def assert_close_scaled(got, want, atol, rtol, scale, name):
    """``|got - want| <= atol * scale + rtol * |want|`` elementwise (``scale`` broadcasts); NaN fails."""
    err = (got - want).abs()
    bound = atol * scale + rtol * want.abs()
    ok = err <= bound
    if not bool(ok.all()):
        worst = int((err - bound).nan_to_num(float("inf")).argmax())
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {err.numel()} elements off; worst |diff| "
            f"{float(err.flatten()[worst]):.3g} > bound {float(bound.flatten()[worst]):.3g}"
        )
