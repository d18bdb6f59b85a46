"""Op and model benchmarks: every available provider against the reference, results to JSON.

    python -m benchmarks.run [--output benchmarks/results] [--quick]

On a GPU, times are medians of ``triton.testing.do_bench``; on the CPU, medians of
``torch.utils.benchmark.Timer.blocked_autorange``. Each result carries the device, versions and
commit it was measured with; never compare numbers from different runs or devices.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

import moce_kernels
import moceir
from moce_kernels import _extension


def median_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        return float(triton.testing.do_bench(fn, return_mode="median"))
    from torch.utils.benchmark import Timer  # noqa: PLC0415

    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5)
    return statistics.median(m.times) * 1e3


def providers(device: torch.device) -> list[str]:
    native = "cuda" if device.type == "cuda" else "cpu"
    return ["reference"] + ([native] if _extension.is_built(native) else [])


def bench_layernorm2d(device, dtype, quick):
    shapes = [(1, 32, 256, 256)] if quick else [(1, 32, 256, 256), (8, 64, 128, 128), (4, 256, 32, 32)]
    rows = []
    for shape in shapes:
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)
        io_bytes = 2 * x.numel() * x.element_size()
        for prov in providers(device):

            def fwd(prov=prov, x=x, w=w, b=b):
                return moce_kernels.layernorm2d(x, w, b, backend=prov)

            def full(prov=prov, x=x, w=w, b=b, g=g):
                torch.autograd.grad(fwd(prov, x, w, b), (x, w, b), g)

            for mode, fn, nbytes in (("forward", fwd, io_bytes), ("full", full, 3 * io_bytes)):
                ms = median_ms(fn, device)
                rows.append(
                    {
                        "op": "layernorm2d",
                        "shape": list(shape),
                        "dtype": str(dtype),
                        "provider": prov,
                        "mode": mode,
                        "median_ms": ms,
                        "gb_per_s": nbytes / ms / 1e6,
                    }
                )
    return rows


def bench_model(device, dtype, quick):
    sizes = [(1, 128, 128)] if quick else [(1, 128, 128), (4, 128, 128)]
    rows = []
    model = moceir.build_model("moce_ir_s").to(device=device, dtype=dtype).eval()
    for batch, h, w in sizes:
        x = torch.rand(batch, 3, h, w, device=device, dtype=dtype)
        for prov in providers(device):
            model.set_backend(prov)

            def fwd(x=x):
                with torch.inference_mode():
                    return model(x)

            ms = median_ms(fwd, device)
            rows.append(
                {
                    "op": "moce_ir_s.forward",
                    "shape": [batch, 3, h, w],
                    "dtype": str(dtype),
                    "provider": prov,
                    "mode": "inference",
                    "median_ms": ms,
                    "images_per_s": batch / ms * 1e3,
                }
            )
    return rows


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "build": _extension.build_summary(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one shape per benchmark")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = bench_layernorm2d(device, torch.float32, args.quick) + bench_model(
        device, torch.float32, args.quick
    )
    env = environment(device)
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")
    path = args.output / f"{device.type}-{stamp}.json"
    path.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    print(f"{env['device']} | {env['build']} | torch {env['torch']} | {env['threads']} threads")
    print(f"{'op':<20} {'shape':<20} {'provider':<10} {'mode':<10} {'median ms':>10}")
    for r in rows:
        print(
            f"{r['op']:<20} {'x'.join(map(str, r['shape'])):<20} {r['provider']:<10} {r['mode']:<10} "
            f"{r['median_ms']:>10.3f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
