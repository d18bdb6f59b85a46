"""Pieces shared by the op and model benchmarks: timing, the device's ceilings, providers, results.

Times are medians: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) on a
GPU, ``torch.utils.benchmark.Timer.blocked_autorange`` on the CPU. The ceilings of the roofline
are measured in the same run: the copy bandwidth (a large device-to-device copy, bytes read plus
bytes written) and the matmul rate per dtype. A result file is rewritten after every row, so a
run stopped by its deadline (or killed) still leaves what it measured.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from moce_kernels import _backend, _extension

#: Version of the result-file layout (benchmarks/report.py reads it).
SCHEMA = 1
#: The ops of the contract, in the order the harness runs them.
OPS = (
    "route",
    "dispatch",
    "combine",
    "dispatch_pointwise",
    "pointwise_combine",
    "dwconv_gate_pointwise",
    "dwconv_gelu_gate",
    "fused_pointwise",
    "grouped_dwconv",
    "grouped_layernorm2d",
    "grouped_patch_fft_conv",
    "grouped_pointwise",
    "layernorm2d",
    "patch_fft_conv",
    "qk_gram",
    "channel_attention_map",
    "attention_projection_fold",
)
#: Concrete non-reference backends, in the order they are reported.
FAST_BACKENDS = ("triton", "cuda", "cpu")
ROOT = Path(__file__).resolve().parent.parent


class Deadline:
    """A wall-clock limit (``time.time()`` seconds); ``None`` means no limit."""

    def __init__(self, at: float | None = None) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.time() + seconds)

    def remaining(self) -> float:
        return math.inf if self.at is None else self.at - time.time()

    def allows(self, seconds: float) -> bool:
        """Whether ``seconds`` of work still fit before the deadline."""
        return self.remaining() > seconds


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    min_time_s: float = 0.2,
    min_samples: int = 3,
    warmup: int = 1,
) -> Timing:
    """Median time of ``fn`` in milliseconds, after ``warmup`` calls (which compile/JIT).

    ``min_time_s`` is the least measuring time; a slow ``fn`` still gets about ``min_samples``
    samples (do_bench repeats on a GPU, blocked_autorange blocks on the CPU).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    estimate_s = max(time.perf_counter() - start, 1e-6)
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        rep_ms = max(min_time_s * 1e3, min_samples * estimate_s * 1e3)
        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=min(25.0, 2 * estimate_s * 1e3), rep=rep_ms, quantiles=[0.5, 0.2, 0.8]
        )
        return Timing(float(median), float(p20), float(p80), max(1, int(rep_ms / (estimate_s * 1e3))))
    from torch.utils.benchmark import Timer  # noqa: PLC0415

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=max(min_time_s, min_samples * estimate_s))
    times_ms = [t * 1e3 for t in m.times]
    return Timing(m.median * 1e3, _quantile(times_ms, 0.2), _quantile(times_ms, 0.8), len(times_ms))


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``nbytes`` (random data)."""
    src = torch.randn(max(1, nbytes // 4), device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, min_time_s=0.3)
    moved = 2 * src.numel() * src.element_size()
    return {"copy_bytes": moved, "copy_ms": t.median_ms, "copy_gb_per_s": moved / t.median_ms / 1e6}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """TFLOP/s of an n x n x n product in ``dtype`` (random inputs; TF32 as torch's default)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = measure(lambda: a @ b, device, min_time_s=0.3)
    return 2 * n**3 / t.median_ms / 1e9


def ceilings(device: torch.device, size: str = "full") -> dict:
    """The roofline's two ceilings, measured now: copy bandwidth and matmul rate per dtype."""
    if device.type == "cuda":
        copy_bytes = {"full": 1 << 30, "quick": 1 << 29, "tiny": 1 << 24}[size]
        rates = {"bfloat16": 8192, "float16": 8192, "float32": 4096}
        if size == "tiny":
            rates = dict.fromkeys(rates, 1024)
    else:
        copy_bytes = {"full": 1 << 28, "quick": 1 << 27, "tiny": 1 << 22}[size]
        rates = {"float32": {"full": 1024, "quick": 768, "tiny": 512}[size]}
    out = copy_bandwidth(device, copy_bytes)
    out["matmul_tflops"] = {name: matmul_rate(device, getattr(torch, name), n) for name, n in rates.items()}
    out["matmul_n"] = rates
    if device.type == "cuda":
        out["allow_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        out["allow_tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    return out


def roofline_ms(nbytes: float, flops: float, dtype_name: str, ceil: dict) -> float:
    """The floor on time: the larger of bytes over copy bandwidth and flops over matmul rate."""
    bw_ms = nbytes / ceil["copy_gb_per_s"] / 1e6 if ceil.get("copy_gb_per_s") else 0.0
    rates = ceil.get("matmul_tflops", {})
    rate = rates.get(dtype_name) or rates.get("float32")
    fl_ms = flops / rate / 1e9 if rate and flops else 0.0
    return max(bw_ms, fl_ms)


def op_providers(op: str, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """``reference`` plus every backend ``resolve_backend`` accepts for ``op`` on ``device``.

    Returns (providers, {backend: why it is not usable}). Triton is never timed on the CPU
    (there it would run in the interpreter: a correctness tool, not a benchmark).
    """
    usable, unavailable = ["reference"], {}
    for backend in FAST_BACKENDS:
        if backend == "triton" and device.type != "cuda":
            unavailable[backend] = "Triton numbers need a CUDA GPU"
            continue
        try:
            chosen = _backend.resolve_backend(op, backend, device)
        except (RuntimeError, ValueError) as e:
            unavailable[backend] = str(e)
            continue
        if chosen == backend:
            usable.append(backend)
    return usable, unavailable


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout. MOCE_COMMIT, when set, wins: a copied tree (the device
    machine's) can carry a stale .git whose HEAD is not the commit the files come from."""
    if os.environ.get("MOCE_COMMIT"):
        return os.environ["MOCE_COMMIT"], None
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return head, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def source_fingerprint() -> str:
    """sha256 (12 hex) of the sources that decide the numbers: identifies a run without git."""
    digest = hashlib.sha256()
    for folder in ("moce_kernels", "moceir", "csrc", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".cpp", ".cu", ".cuh", ".h"} and path.is_file():
                digest.update(str(path.relative_to(ROOT)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a number was measured with: device, versions, build, commit, date."""
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other processes share a CPU: the load at the start says how quiet it was.
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "build": _extension.build_summary(),
        "commit": commit,
        "dirty": dirty,
        "source_sha": source_fingerprint(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["capability"] = f"{props.major}.{props.minor}"
        env["multiprocessors"] = props.multi_processor_count
        env["memory_bytes"] = props.total_memory
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rel_error(got: Iterable[torch.Tensor], want: Iterable[torch.Tensor]) -> float:
    """max over tensors of ||got - want|| / ||want|| (float64); integer tensors must match exactly."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return math.inf
        if not (g.is_floating_point() or w.is_floating_point()):
            worst = max(worst, 0.0 if torch.equal(g.cpu(), w.cpu()) else math.inf)
            continue
        g64, w64 = g.detach().double().cpu(), w.detach().double().cpu()
        if not torch.isfinite(g64).all():
            return math.inf
        denom = float(w64.norm())
        err = float((g64 - w64).norm())
        worst = max(worst, err / denom if denom > 0 else err)
    return worst


class ResultFile:
    """One run's JSON file, rewritten atomically after every row."""

    def __init__(self, path: Path, payload: dict) -> None:
        self.path = path
        self.payload = payload
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, row: dict) -> None:
        self.payload["results"].append(row)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.payload, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def shape_text(shape: Iterable[int]) -> str:
    return "x".join(str(s) for s in shape)
