"""``moceir bench``: benchmarks of the available backends.

In a source checkout this runs the project's suite (``python -m benchmarks.run``: every op and
the model, every provider, results to JSON), passing the arguments it does not know through
(``moceir bench --quick``). Without it (an installed package), or with ``--builtin``, it times
MoCE-IR-S inference with each backend that can run here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import moce_kernels
import moceir
from moceir.runtime import resolve_device


def usable_backends(device: torch.device) -> dict[str, str]:
    """Backend -> "" when it can run the model on ``device``, else why not. Triton is skipped on
    the CPU (its interpreter is a debugging tool, far too slow to time)."""
    out = {}
    probe = moceir.build_model(
        "moce_ir_s", dim=8, num_blocks=(1, 1, 1, 1), num_dec_blocks=(1, 1, 1), num_refinement_blocks=1
    )
    for b in moce_kernels.BACKENDS:
        if b == "triton" and device.type != "cuda":
            out[b] = "needs a CUDA GPU"
            continue
        if b == "cuda" and device.type != "cuda":
            out[b] = "needs a CUDA GPU"
            continue
        try:
            probe.set_backend(b)
            out[b] = ""
        except (RuntimeError, ValueError) as e:
            out[b] = str(e).split(";")[0]
    return out


def time_model(model: moceir.MoCEIR, x: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of one eval forward of ``x`` (after one warm-up call)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        model(x)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def backend_speeds(
    model: moceir.MoCEIR, x: torch.Tensor, repeats: int = 3
) -> list[tuple[str, float | None, str]]:
    """(backend, seconds per forward or None, note) for every backend; restores "auto" after."""
    rows = []
    for b, why in usable_backends(x.device).items():
        if why:
            rows.append((b, None, why))
            continue
        model.set_backend(b)
        rows.append((b, time_model(model, x, repeats), ""))
    model.set_backend("auto")
    return rows


def format_speeds(rows: list[tuple[str, float | None, str]], images: int) -> str:
    lines = []
    for b, sec, why in rows:
        if sec is None:
            lines.append(f"  {b:<10} unavailable: {why}")
        else:
            lines.append(f"  {b:<10} {sec * 1000:9.1f} ms per batch ({images / sec:6.2f} images/s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not args.builtin:
        try:
            from benchmarks import run as suite  # noqa: PLC0415
        except ImportError:
            print(
                "the benchmark suite (benchmarks/, in a source checkout) is not importable here: "
                "timing the model only",
                file=sys.stderr,
            )
        else:
            return int(suite.main(args.suite_args) or 0)
    device = resolve_device(args.device)
    model = moceir.build_model(args.config).to(device).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    print(f"{args.config} eval forward, batch {args.batch} x {args.size}x{args.size}, {device}:")
    print(format_speeds(backend_speeds(model, x, args.repeats), args.batch))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--builtin", action="store_true", help="time the model per backend, not the full suite"
    )
    parser.add_argument("--config", default="moce_ir_s", choices=sorted(moceir.CONFIGS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.set_defaults(func=run, suite_args=[])


DESCRIPTION = __doc__
