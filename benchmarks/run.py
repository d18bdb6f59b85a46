"""Op and model benchmarks: every available provider against the reference, results to JSON.

    python -m benchmarks.run [--suite ops|models|all] [--output benchmarks/results]
                             [--quick | --tiny] [--device cuda|cpu] [--budget SECONDS]

Op benchmarks (benchmarks/ops.py): every op of ``benchmarks.common.OPS`` at MoCE-IR-S training
shapes, providers "reference" plus every backend
``moce_kernels._backend.resolve_backend`` accepts on the device (found at run time: a new
``triton.py`` or ``compiled.py`` is picked up without editing this harness), modes forward /
backward / full. Model benchmarks (benchmarks/models.py): inference, training step and one
1920 x 1080 video frame per model backend, against the eager and the compiled reference.

On a GPU, times are medians of ``triton.testing.do_bench``; on the CPU, of
``torch.utils.benchmark``. Copy bandwidth and matmul rate are measured in the same run (the
roofline). Each run writes one JSON file (device, versions, commit, date) under ``--output``,
rewritten after every row so that a run stopped by ``--budget`` keeps what it measured; render
them with ``python -m benchmarks.report``. Never compare numbers across runs or devices.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import OPS, SCHEMA, Deadline, ResultFile, ceilings, environment

SUITES = ("ops", "models")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    size.add_argument("--tiny", action="store_true", help="toy sizes: checks that everything runs")
    size.add_argument(
        "--issue-shapes",
        action="store_true",
        help="models: the inference workloads at the issue's sizes (batch 1 at 512 x 512, batch 16 at "
        "256 x 256, float32) on any device; ops: the full sizes",
    )
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument(
        "--workloads", default="inference,training,video,adapter", help="comma-separated model workloads"
    )
    parser.add_argument(
        "--model-providers",
        default=None,
        help="comma-separated model providers to run (default: every usable one), e.g. "
        "reference,auto,graphed-auto,compiled-reference: a short GPU run spends its time on these",
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help="op dtypes, e.g. float32,bfloat16 (default: both on GPU, float32 on CPU)",
    )
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None)
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds; stop cleanly after them")
    parser.add_argument("--deadline", type=float, default=None, help="absolute time.time() to stop by")
    parser.add_argument("--name", default="", help="extra word in the result file's name")
    args = parser.parse_args(argv)
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    if args.model_providers:
        from benchmarks.models import MODEL_PROVIDERS  # noqa: PLC0415

        unknown = set(args.model_providers.split(",")) - set(MODEL_PROVIDERS)
        if unknown:
            parser.error(f"unknown model providers {sorted(unknown)}; choose from {MODEL_PROVIDERS}")
    return args


def _print_row(r: dict) -> None:
    what = r.get("op") or r.get("workload")
    extra = r.get("mode") or r.get("precision")
    label = " ".join(str(x) for x in (what, r.get("case"), r.get("dtype"), extra) if x)
    if r["status"] != "ok":
        print(f"  {label:<58} {r['provider']:<19} {r['status']}: {r.get('error', '')[:80]}", flush=True)
        return
    more = ""
    if r.get("roofline_fraction") is not None:
        more = f" {100 * r['roofline_fraction']:5.1f}% roofline"
    if r.get("frames_per_s") is not None:
        more += f" {r['frames_per_s']:.2f} frames/s"
    print(f"  {label:<58} {r['provider']:<19} {r['median_ms']:10.3f} ms{more}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    size = "tiny" if args.tiny else "quick" if args.quick else "full"  # ops, ceilings
    model_size = "issue" if args.issue_shapes else size
    suites = SUITES if args.suite == "all" else (args.suite,)
    deadline = Deadline(args.deadline) if args.deadline else Deadline.after(args.budget)
    # The device check stops us with SIGINT (or SIGTERM): both end the run as "incomplete". Set
    # both, as SIGINT arrives ignored in a process a script started in the background.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['build']}")
    shown = f"{model_size} (models), {size} (ops)" if model_size != size else size
    print(f"commit {env['commit'][:12]} | {env['threads']} threads | sizes: {shown}", flush=True)
    ceil = ceilings(device, size)
    rates = ", ".join(f"{k} {v:.2f}" for k, v in ceil["matmul_tflops"].items())
    print(f"copy {ceil['copy_gb_per_s']:.1f} GB/s (read + write) | matmul TFLOP/s: {rates}", flush=True)
    if device.type != "cuda":
        print(
            "CPU only: timing the reference and the C++ CPU kernels; the Triton and CUDA numbers need a GPU"
        )
        load = env.get("loadavg") or [0.0]
        if load[0] > (env.get("cpu_count") or 1) and torch.get_num_threads() > 1:
            # Each OpenMP barrier then waits for a time slice: multi-threaded timings inflate
            # several-fold (seen here: 7-14 s instead of 1.5 s single-threaded).
            print(f"warning: load average {load[0]:.1f} on {env['cpu_count']} cores; --threads 1 is steadier")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = "-".join(x for x in (device.type, stamp, "+".join(suites), model_size, args.name) if x)
    results = ResultFile(
        args.output / f"{name}.json",
        {
            "schema": SCHEMA,
            "environment": env,
            "size": model_size,
            "suites": list(suites),
            "ceilings": ceil,
            "unavailable": {},
            "complete": False,
            "results": [],
        },
    )

    def emit(row: dict) -> None:
        results.add(row)
        _print_row(row)

    start = time.perf_counter()
    try:
        if "ops" in suites:
            from benchmarks.ops import run_op  # noqa: PLC0415

            if args.dtypes:
                dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
            else:
                dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
            # do_bench's default 100 ms of repeats on a GPU; longer on a shared CPU.
            min_time = 0.05 if size == "tiny" else 0.1 if device.type == "cuda" else 0.2
            for op in args.ops.split(","):
                print(f"{op}:", flush=True)
                why = run_op(op, device, dtypes, size, ceil, emit, deadline, min_time_s=min_time)
                results.payload["unavailable"][op] = why
                results.write()
        if "models" in suites:
            from benchmarks.models import run_models  # noqa: PLC0415

            print("moce_ir_s:", flush=True)
            why = run_models(
                device,
                model_size,
                ceil,
                emit,
                deadline,
                compile_reference=args.compile,
                kinds=tuple(args.workloads.split(",")),
                min_time_s=0.05 if size == "tiny" else 0.3,
                min_samples=1 if size == "tiny" else 5 if device.type == "cuda" else 3,
                only=tuple(args.model_providers.split(",")) if args.model_providers else None,
            )
            results.payload["unavailable"]["moce_ir_s"] = why
        results.payload["complete"] = not any(r["status"] == "skipped" for r in results.payload["results"])
    except KeyboardInterrupt:
        print("interrupted: keeping the rows measured so far", file=sys.stderr)
    finally:
        results.payload["elapsed_s"] = time.perf_counter() - start
        results.write()
    rows = results.payload["results"]
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok} of {len(rows)} rows measured; wrote {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
