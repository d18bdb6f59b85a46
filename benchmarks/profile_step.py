"""Where a model workload's time goes: torch.profiler over a few steps, per provider.

    python -m benchmarks.profile_step [--device cuda] [--workloads training,inference]
                                      [--providers reference,auto] [--steps 3] [--top 25]
                                      [--output DIR]

For each (workload, provider) of ``benchmarks.models`` (the same model, weights and step
functions as the timed benchmarks) it reports the wall time of a step, the device's busy time
(the sum of every kernel's time: a step whose kernels add up to much less than its wall time is
bound by the host, launches and syncs, not by the GPU), the kernel count per step, and the top
kernels by their own device time. On a CPU there are no kernels: the top operators by their own
CPU time are listed instead. One JSON file and one text table per run under ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import ceilings, environment, synchronize
from benchmarks.models import ModelBench, Workload, benchmark_mode, workloads


def _self_device_us(evt) -> float:
    # torch renamed self_cuda_time_total to self_device_time_total (2.4); keep both.
    return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)))


def profile_job(bench: ModelBench, wl: Workload, provider: str, steps: int, top: int) -> dict:
    with benchmark_mode(provider):
        return _profile(bench, wl, provider, steps, top)


def _profile(bench: ModelBench, wl: Workload, provider: str, steps: int, top: int) -> dict:
    _, fn = bench.step_fn(wl, provider)
    for _ in range(2):  # compile, load kernels, warm the allocator
        fn()
    synchronize(bench.device)
    on_gpu = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(bench.device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    if on_gpu:
        # Kernels (and memcpy/memset) are the events that ran on the device by themselves.
        # User annotations (``Optimizer.step#AdamW.step``, ``ProfilerStep#``) carry their
        # children's device time again: leave them out, or the busy time counts kernels twice.
        rows = [
            e
            for e in events
            if _self_device_us(e) > 0
            and e.device_type.name != "CPU"
            and not getattr(e, "is_user_annotation", False)
            and "#" not in e.key
        ]
        if not rows:  # older layouts: device time hangs off the CPU-side launch events
            rows = [e for e in events if _self_device_us(e) > 0]
        key = _self_device_us
    else:
        rows = [e for e in events if e.key.startswith("aten::")]

        def key(e):
            return float(e.self_cpu_time_total)

    busy_us = sum(key(e) for e in rows)
    rows.sort(key=key, reverse=True)
    return {
        "workload": wl.kind,
        "case": wl.case,
        "precision": wl.precision,
        "provider": provider,
        "wall_ms_per_step": wall_ms,
        "busy_ms_per_step": busy_us / 1e3 / steps,
        "busy_is": "device kernels" if on_gpu else "aten operators' own CPU time",
        "calls_per_step": sum(e.count for e in rows) / steps,
        "top": [
            {
                "name": e.key[:160],
                "calls_per_step": e.count / steps,
                "ms_per_step": key(e) / 1e3 / steps,
                "share": key(e) / busy_us if busy_us else None,
            }
            for e in rows[:top]
        ],
    }


def render(results: list[dict]) -> str:
    out = []
    for r in results:
        if "error" in r:
            out.append(f"== {r['workload']} {r['case']} {r['precision']} {r['provider']}: {r['error']}")
            continue
        out.append(
            f"== {r['workload']} {r['case']} {r['precision']} {r['provider']}: "
            f"wall {r['wall_ms_per_step']:.2f} ms/step, busy {r['busy_ms_per_step']:.2f} ms "
            f"({r['busy_is']}), {r['calls_per_step']:.0f} calls/step"
        )
        for t in r["top"]:
            share = f"{100 * t['share']:5.1f}%" if t["share"] is not None else "  -  "
            out.append(f"  {t['ms_per_step']:9.3f} ms {share} x{t['calls_per_step']:<6.0f} {t['name'][:110]}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="training,inference")
    parser.add_argument("--providers", default="reference,auto")
    parser.add_argument(
        "--size",
        choices=("full", "quick", "tiny"),
        default=None,
        help="workload sizes of benchmarks.models (default: quick on GPU, tiny on CPU)",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        parser.error("--steps and --top must be >= 1")
    device = torch.device(args.device)
    size = args.size or ("quick" if device.type == "cuda" else "tiny")
    kinds = args.workloads.split(",")
    chosen = [wl for wl in workloads(device, size) if wl.kind in kinds]
    # One workload per kind: the first (most important) of each, in the order --workloads names.
    chosen = [wl for i, wl in enumerate(chosen) if wl.kind not in {w.kind for w in chosen[:i]}]
    chosen.sort(key=lambda wl: kinds.index(wl.kind))
    bench = ModelBench(device, ceilings(device, "tiny"), overrides=None)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    args.output.mkdir(parents=True, exist_ok=True)
    base = args.output / f"profile-{device.type}-{stamp}"
    payload = {"environment": environment(device), "steps": args.steps, "results": []}
    results = payload["results"]
    base.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    for wl in chosen:
        for provider in args.providers.split(","):
            try:
                results.append(profile_job(bench, wl, provider, args.steps, args.top))
            except Exception as e:  # noqa: BLE001  (one broken provider must not stop the rest)
                results.append(
                    {
                        "workload": wl.kind,
                        "case": wl.case,
                        "precision": wl.precision,
                        "provider": provider,
                        "error": f"{type(e).__name__}: {e}"[:400],
                    }
                )
            print(render(results[-1:]), flush=True)
            # Rewritten after every job: a run stopped by its budget keeps what it profiled
            # (an H100 run lost every profile when the stage's time ran out in the last one).
            base.with_suffix(".json").write_text(json.dumps(payload, indent=1))
            base.with_suffix(".txt").write_text(render(results) + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"wrote {base}.json and .txt")


if __name__ == "__main__":
    main()
