"""``moceir test``: PSNR and SSIM on the paper's benchmarks, computed as the paper does.

Metrics: ``skimage.metrics.peak_signal_noise_ratio(clean, restored, data_range=1)`` and
``structural_similarity(clean, restored, channel_axis=2, gaussian_weights=True, data_range=1)``
on full RGB float images in 0..1, the output clamped to 0..1 (not quantised to 8 bits), averaged
over the images of a benchmark: exactly the official test script's calls.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from moceir.data.benchmarks import Benchmark
from moceir.data.layouts import TASK_ALIASES, TASKS, TEST_LAYOUTS, DatasetLayoutError, describe_layouts
from moceir.images import write_png
from moceir.restore import Restorer, _atomic_text, adapter_names, plan_batches
from moceir.runtime import CLIError, add_model_arguments, load_model, resolve_device


def psnr(clean: np.ndarray, restored: np.ndarray) -> float:
    """PSNR in dB of ``restored`` (clamped to 0..1) against ``clean``, both [H, W, 3] in 0..1."""
    return float(peak_signal_noise_ratio(clean, np.clip(restored, 0, 1).astype(clean.dtype), data_range=1.0))


def ssim(clean: np.ndarray, restored: np.ndarray) -> float:
    """Gaussian-weighted SSIM over the RGB channels (the official call)."""
    return float(
        structural_similarity(
            clean,
            np.clip(restored, 0, 1).astype(clean.dtype),
            channel_axis=2,
            gaussian_weights=True,
            data_range=1.0,
        )
    )


def evaluate_benchmark(
    bench: Benchmark,
    restorer: Restorer,
    blocks: list[str],
    save_dir: Path | None = None,
    progress: bool = True,
    workers: int = 2,
) -> list[dict]:
    """Restore every image of ``bench``; one dict per image (name, subset, psnr, ssim, experts)."""
    sizes = [bench.size(i) for i in range(len(bench))]
    rows: list[dict] = []
    bar = tqdm(total=len(bench), desc=bench.task, unit="img", disable=not progress, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for idx in plan_batches(sizes, restorer.batch_size):
            images = [bench[i] for i in idx]
            start = time.perf_counter()
            results = restorer([im.degraded for im in images])
            seconds = (time.perf_counter() - start) / len(idx)
            metrics = pool.map(
                lambda pair: (psnr(pair[0].clean, pair[1].image), ssim(pair[0].clean, pair[1].image)),
                list(zip(images, results, strict=True)),
            )
            for im, res, (p, s) in zip(images, results, metrics, strict=True):
                rows.append(
                    {
                        "benchmark": bench.task,
                        "subset": im.subset,
                        "image": im.name,
                        "psnr": p,
                        "ssim": s,
                        "input_psnr": psnr(im.clean, im.degraded),
                        "experts": dict(zip(blocks, res.experts, strict=True)),
                        "seconds": seconds,
                    }
                )
                if save_dir is not None:
                    sub = save_dir / bench.task / im.subset if im.subset else save_dir / bench.task
                    write_png(sub / f"{im.name}.png", res.image)
            bar.update(len(idx))
    bar.close()
    return rows


def summarise(rows: list[dict], blocks: list[str]) -> list[dict]:
    """Mean PSNR/SSIM per benchmark (and per CDD-11 subset), with the most frequent expert per block."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["subset"]), []).append(r)
        if r["subset"]:
            groups.setdefault((r["benchmark"], "all"), []).append(r)
    table = []
    for (name, subset), rs in groups.items():
        routing = {}
        for b in blocks:
            c = Counter(e for r in rs for e in r["experts"][b])
            routing[b] = {str(k): v for k, v in sorted(c.items())}
        table.append(
            {
                "benchmark": name + (f"/{subset}" if subset else ""),
                "images": len(rs),
                "psnr": float(np.mean([r["psnr"] for r in rs])),
                "ssim": float(np.mean([r["ssim"] for r in rs])),
                "input_psnr": float(np.mean([r["input_psnr"] for r in rs])),
                "seconds_per_image": float(np.mean([r["seconds"] for r in rs])),
                "expert_histogram": routing,
            }
        )
    return table


def _majority_by_level(hist: dict[str, dict[str, int]], blocks: list[str]) -> str:
    levels: dict[str, list[str]] = {}
    for b in blocks:
        level = b.split(".")[0]
        counts = hist[b]
        levels.setdefault(level, []).append(max(counts, key=counts.get) if counts else "-")
    return " | ".join("".join(v) for v in levels.values())


def format_table(table: list[dict], blocks: list[str]) -> str:
    head = (
        f"{'benchmark':<24} {'images':>6} {'PSNR':>7} {'SSIM':>7} {'input PSNR':>10}  "
        "experts (most frequent per block, deepest level first)"
    )
    lines = [head, "-" * len(head)]
    for t in table:
        lines.append(
            f"{t['benchmark']:<24} {t['images']:>6} {t['psnr']:>7.2f} {t['ssim']:>7.4f} "
            f"{t['input_psnr']:>10.2f}  " + _majority_by_level(t["expert_histogram"], blocks)
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        benches = [Benchmark(b, args.data, args.crop_multiple, args.limit) for b in args.benchmarks]
    except DatasetLayoutError as e:
        raise CLIError(str(e)) from e
    except ValueError as e:  # unknown benchmark name
        raise CLIError(str(e)) from e
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, backend=args.backend, device=device, precision=args.precision)
    if args.eval_noise:
        # The official test script's behaviour: routing noise in eval too, seeded once with 0.
        for adapter in model.adapters():
            adapter.eval_noise = True
        torch.manual_seed(0)
    blocks = adapter_names(model)
    try:
        restorer = Restorer(model, device, args.batch_size, args.tile, args.tile_overlap)
    except ValueError as e:
        raise CLIError(str(e)) from e
    save_dir = Path(args.save_outputs) if args.save_outputs else None
    rows: list[dict] = []
    for bench in benches:
        try:
            rows += evaluate_benchmark(
                bench, restorer, blocks, save_dir, progress=not args.quiet, workers=args.workers
            )
        except DatasetLayoutError as e:  # an unreadable or mismatched test image
            raise CLIError(str(e)) from e
    table = summarise(rows, blocks)
    print(format_table(table, blocks))
    results = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "crop_multiple": args.crop_multiple,
        "eval_noise": args.eval_noise,
        "metrics": "skimage PSNR / SSIM(gaussian_weights=True, channel_axis=2), data_range 1, clamped RGB",
        "decoder_blocks": blocks,
        "summary": table,
        "images": rows,
    }
    if args.results:
        out = Path(args.results)
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_text(out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["benchmark", "images", "psnr", "ssim", "input_psnr", "seconds_per_image"])
        for t in table:
            w.writerow(
                [
                    t["benchmark"],
                    t["images"],
                    f"{t['psnr']:.4f}",
                    f"{t['ssim']:.5f}",
                    f"{t['input_psnr']:.4f}",
                    f"{t['seconds_per_image']:.4f}",
                ]
            )
        _atomic_text(out.with_suffix(".csv"), buf.getvalue())
        print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.csv')}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, checkpoint_required=True)
    parser.add_argument("--data", required=True, help="root folder of the test sets (layout below)")
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        required=True,
        choices=[*TASKS, *TASK_ALIASES],
        metavar="NAME",
        help=f"any of {', '.join(TASKS)} (aliases: {', '.join(TASK_ALIASES)})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images of equal size per model call (default 1)"
    )
    parser.add_argument(
        "--tile", type=int, default=0, help="tiled inference for images larger than N x N (0: off)"
    )
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument(
        "--crop-multiple",
        type=int,
        default=16,
        help="centre-crop test images to multiples of N as the official code (16, default); 1: full images",
    )
    parser.add_argument("--save-outputs", metavar="DIR", help="write the restored images to DIR/<benchmark>/")
    parser.add_argument(
        "--results", metavar="FILE", help="write the table and per-image metrics to FILE.json / FILE.csv"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each benchmark")
    parser.add_argument(
        "--eval-noise",
        action="store_true",
        help="add the routing noise at test time as the official script does (random results; "
        "default: deterministic routing)",
    )
    parser.add_argument("--workers", type=int, default=2, help="threads computing the metrics")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


DESCRIPTION = __doc__.split("\n\n")[0].replace("``moceir test``: ", "") + (
    "\n\nPSNR/SSIM as the official test script (scikit-image, Gaussian-weighted SSIM, clamped RGB),\n"
    "one table row per benchmark (CDD-11: per degradation and overall)."
)

EPILOG = (
    "expected layout under --data (the official MoCE-IR / PromptIR release):\n"
    + describe_layouts(TEST_LAYOUTS)
    + "\n\nexample:\n  moceir test --checkpoint MoCE_IR_S_AIO3/last.ckpt --data data \\\n"
    "      --benchmarks denoise_15 denoise_25 denoise_50 derain dehaze --save-outputs results/"
)
