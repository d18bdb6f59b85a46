"""``moceir demo``: train MoCE-IR-S for a few minutes on synthetic degradations, then show it.

1. Degrades colour photographs bundled with scikit-image (no download) with the seven synthetic
   tasks: Gaussian noise sigma 15/25/50, rain streaks, haze (atmospheric scattering), motion
   blur, low light.
2. Trains MoCE-IR-S (the full network) on small crops for a fixed budget (``--budget`` seconds:
   the cosine schedule is fitted to the steps that fit in it; ``--steps`` fixes the count) with
   the paper's loss and optimiser (a higher learning rate, for a short run). The output
   convolution starts at zero, so the untrained network is the identity (a residual network's
   usual trick for short runs).
3. Restores held-out photographs (never seen in training) and prints per task the PSNR before
   and after and the expert chosen in each decoder block; times every backend that can run here;
   saves ``grid.png`` (degraded / restored / clean), ``routing.png`` and the trained weights.

A few CPU minutes (about 200 steps on 2 cores) are far from the paper's 150 epochs on 4 GPUs:
the network first learns a generic correction, so strong noise and low light gain several dB
while mild degradations (noise sigma 15, blur) can lose some, and the routing has only begun to
separate the tasks. A larger ``--budget`` trains longer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import moce_kernels
import moceir
from moceir.bench import backend_speeds, format_speeds
from moceir.checkpoint import save_checkpoint
from moceir.data.degradations import SYNTHETIC_TASKS, degrade
from moceir.data.training import TrainingStream, TrainItem
from moceir.evaluate import psnr
from moceir.restore import adapter_names
from moceir.runtime import CLIError, load_model, resolve_device
from moceir.samples import HELD_OUT_PHOTOS, TRAIN_PHOTOS, demo_photos
from moceir.train import Recipe, StopRequest, Trainer

DEMO_TASKS = ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur", "lowlight")
#: Tiny network for --quick (tests): same code paths, a fraction of the cost.
QUICK_OVERRIDES = {
    "dim": 8,
    "num_blocks": (1, 1, 1, 1),
    "num_dec_blocks": (1, 1, 1),
    "num_refinement_blocks": 1,
}


def held_out_set(tasks: tuple[str, ...], size: tuple[int, int], seed: int = 1234) -> dict[str, list]:
    """Per task, ``(name, degraded, clean)`` for centre crops of the held-out photographs."""
    photos = demo_photos(HELD_OUT_PHOTOS, longest_side=max(2 * size[1], 64))
    h, w = size
    out: dict[str, list] = {}
    for t_idx, task in enumerate(tasks):
        rng = np.random.default_rng([seed, t_idx])
        rows = []
        for name, im in photos.items():
            top, left = (im.shape[0] - h) // 2, (im.shape[1] - w) // 2
            clean = im[top : top + h, left : left + w].astype(np.float32) / 255.0
            rows.append((name, degrade(task, clean, rng), clean))
        out[task] = rows
    return out


def experts_by_level(model: moceir.MoCEIR, experts: list[list[int]]) -> str:
    """``dec0: 1 1 1 1 | dec1: ...`` from per-block expert lists (first choice of each block)."""
    parts, start = [], 0
    for level, n in enumerate(model.config.num_dec_blocks):
        parts.append(f"dec{level}: " + " ".join(str(e[0]) for e in experts[start : start + n]))
        start += n
    return " | ".join(parts)


def _majority(per_image: np.ndarray) -> list[list[int]]:
    """[images, blocks, k] -> per block, the most frequent first choice."""
    out = []
    for b in range(per_image.shape[1]):
        values, counts = np.unique(per_image[:, b, 0], return_counts=True)
        out.append([int(values[np.argmax(counts)])])
    return out


def evaluate(model: moceir.MoCEIR, held_out: dict[str, list], device: torch.device) -> dict[str, dict]:
    """Per task: input/output PSNR (means over the held-out images), routing, restored images."""
    model.eval()
    results = {}
    with torch.inference_mode():
        for task, rows in held_out.items():
            x = torch.from_numpy(np.stack([r[1] for r in rows])).permute(0, 3, 1, 2).to(device)
            y = model(x).float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            experts = torch.stack(model.routing_choices(), dim=1).cpu().numpy()  # [B, blocks, k]
            results[task] = {
                "psnr_in": float(np.mean([psnr(r[2], r[1]) for r in rows])),
                "psnr_out": float(np.mean([psnr(r[2], o) for r, o in zip(rows, y, strict=True)])),
                "experts": _majority(experts),
                "experts_per_image": experts[:, :, 0].tolist(),
                "restored": y,
            }
    return results


def save_grid(path: Path, held_out: dict[str, list], results: dict[str, dict]) -> None:
    """One row per task (first held-out image): degraded | restored | clean, labelled."""
    tiles = []
    pad, label_h = 4, 14
    for task, rows in held_out.items():
        name, degraded, clean = rows[0]
        restored = results[task]["restored"][0]
        row = np.concatenate(
            [
                degraded,
                np.ones((degraded.shape[0], pad, 3)),
                restored,
                np.ones((degraded.shape[0], pad, 3)),
                clean,
            ],
            axis=1,
        )
        tiles.append((task, row))
    h, w = tiles[0][1].shape[:2]
    canvas = Image.new("RGB", (w + 2 * pad, len(tiles) * (h + label_h + pad) + label_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    col = (w - 2 * pad) // 3
    for i, head in enumerate(("degraded", "restored", "clean")):
        draw.text((pad + i * (col + pad) + 2, 2), head, fill="black")
    y = label_h + pad
    for task, row in tiles:
        r = results[task]
        draw.text((pad + 2, y), f"{task}: {r['psnr_in']:.2f} -> {r['psnr_out']:.2f} dB", fill="black")
        canvas.paste(Image.fromarray(np.round(np.clip(row, 0, 1) * 255).astype(np.uint8)), (pad, y + label_h))
        y += h + label_h + pad
    canvas.save(path)


def save_routing_plot(path: Path, model: moceir.MoCEIR, results: dict[str, dict]) -> bool:
    """Heat map tasks x decoder blocks of the expert chosen (majority over held-out images)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    blocks = adapter_names(model)
    tasks = list(results)
    grid = np.array([[e[0] for e in results[t]["experts"]] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(blocks), 1.0 + 0.45 * len(tasks)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=model.config.num_experts - 1, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(
                j, i, str(grid[i, j]), ha="center", va="center", color="white" if grid[i, j] < 2 else "black"
            )
    ax.set_xticks(range(len(blocks)), blocks, rotation=60, fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_title("expert chosen per decoder block (0 = cheapest)", fontsize=9)
    fig.colorbar(im, ax=ax, ticks=range(model.config.num_experts), fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def train_demo_model(args: argparse.Namespace, device: torch.device, tasks: tuple[str, ...]) -> moceir.MoCEIR:
    overrides = QUICK_OVERRIDES if args.quick else {}
    torch.manual_seed(args.seed)
    model = moceir.build_model("moce_ir_s", backend=args.backend, **overrides)
    with torch.no_grad():
        model.output.weight.zero_()
    photos = demo_photos(TRAIN_PHOTOS, longest_side=64 if args.quick else 256)
    items = [TrainItem(task, im) for task in tasks for im in photos.values()]
    stream = TrainingStream(items, args.crop, args.batch_size, seed=args.seed)
    warmup = 1 if args.quick else 10
    recipe = Recipe(
        config="moce_ir_s",
        model_overrides=overrides,
        tasks=list(tasks),
        crop=args.crop,
        global_batch=args.batch_size,
        lr=args.lr,
        warmup_steps=warmup,
        total_steps=args.steps or 10**9,
        seed=args.seed,
    )
    trainer = Trainer(model, stream, recipe, device, out_dir=None, progress=False, tensorboard=False)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"training MoCE-IR-S ({n_params:,} parameters) on {len(items)} (photo, task) pairs, "
        f"{args.crop}x{args.crop} crops, batch {args.batch_size}, lr {args.lr:g}, "
        + (f"{args.steps} steps" if args.steps else f"budget {args.budget:.0f} s")
    )
    start = time.perf_counter()
    bar = tqdm(total=args.steps or None, unit="step", desc="train", file=sys.stderr, disable=args.quiet)
    timed = args.steps is None
    ema = None
    with StopRequest() as stop:
        while trainer.step_count < recipe.total_steps and not stop.requested:
            metrics = trainer.step()
            ema = metrics["loss"] if ema is None else 0.9 * ema + 0.1 * metrics["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{metrics['lr']:.1e}")
            if timed:
                # The schedule follows the clock: the step count that fits the budget at the
                # speed so far (re-estimated every step, so a slower machine just gets fewer).
                elapsed = time.perf_counter() - start
                if elapsed >= args.budget:
                    break
                done = trainer.step_count
                recipe.total_steps = max(done + 1, warmup + 2, int(done * args.budget / elapsed))
                bar.total = recipe.total_steps
    bar.close()
    if stop.requested:
        print(f"stopped early at step {trainer.step_count} (Ctrl-C): showing the model as it is")
    elapsed = time.perf_counter() - start
    print(
        f"trained {trainer.step_count} steps in {elapsed:.0f} s "
        f"({trainer.step_count * args.batch_size / elapsed:.1f} crops/s), final loss {ema:.4f}"
    )
    return model


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    tasks = tuple(args.tasks)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(moce_kernels.build_summary())
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    if args.checkpoint:
        model = load_model(args.checkpoint, backend=args.backend, device=device)
        print(f"weights: {args.checkpoint} (no training)")
    else:
        model = train_demo_model(args, device, tasks)
        save_checkpoint(model, out / "model.safetensors", overwrite=True)
    size = (24, 32) if args.quick else (96, 128)
    held_out = held_out_set(tasks, size)
    results = evaluate(model, held_out, device)

    print(f"\nheld-out photographs ({', '.join(HELD_OUT_PHOTOS)}, {size[0]}x{size[1]}, never trained on):")
    head = (
        f"{'task':<12} {'PSNR in':>8}    {'out':>6}  {'gain':>6}   "
        "expert per decoder block (0 = cheapest; deepest level first)"
    )
    print(head)
    print("-" * len(head))
    for task, r in results.items():
        gain = r["psnr_out"] - r["psnr_in"]
        print(
            f"{task:<12} {r['psnr_in']:8.2f} -> {r['psnr_out']:6.2f}  {gain:+6.2f}   "
            + experts_by_level(model, r["experts"])
        )

    x = (
        torch.from_numpy(np.stack([r[1] for r in next(iter(held_out.values()))]))
        .permute(0, 3, 1, 2)
        .to(device)
    )
    speeds = backend_speeds(model, x, repeats=1 if args.quick else 3)
    print(f"\nbackend speed, eval forward of {x.shape[0]} x {size[0]}x{size[1]} on {device}:")
    print(format_speeds(speeds, x.shape[0]))

    save_grid(out / "grid.png", held_out, results)
    plotted = save_routing_plot(out / "routing.png", model, results)
    report = {
        "tasks": {t: {k: v for k, v in r.items() if k != "restored"} for t, r in results.items()},
        "decoder_blocks": adapter_names(model),
        "backend_seconds": {b: s for b, s, _ in speeds},
        "weights": args.checkpoint or str(out / "model.safetensors"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nwrote {out}/grid.png"
        + (", routing.png" if plotted else " (routing.png needs matplotlib)")
        + ", report.json"
        + ("" if args.checkpoint else ", model.safetensors")
    )
    if not args.checkpoint:
        print(f"try: moceir restore moceir/assets/samples -o restored/ --checkpoint {out}/model.safetensors")
    print(f"demo took {time.perf_counter() - t0:.0f} s")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="demo_output", help="where the grid, plot and weights go")
    parser.add_argument(
        "--budget", type=float, default=None, help="training time in seconds (default 150; --quick: 4 steps)"
    )
    parser.add_argument("--steps", type=int, default=None, help="train exactly N steps (instead of --budget)")
    parser.add_argument("--crop", type=int, default=32, help="training crop size (default 32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3: a short run)"
    )
    parser.add_argument(
        "--tasks", nargs="+", default=list(DEMO_TASKS), choices=sorted(SYNTHETIC_TASKS), metavar="TASK"
    )
    parser.add_argument("--checkpoint", help="skip training: evaluate these weights instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", choices=moce_kernels.BACKENDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny network and a few steps (tests, smoke checks)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_checked)


def _run_checked(args: argparse.Namespace) -> int:
    if args.quick:
        if args.steps is None and args.budget is None:
            args.steps = 4
        args.crop = min(args.crop, 16)
        args.batch_size = min(args.batch_size, 2)
    if args.budget is None:
        args.budget = 150.0
    if args.crop < 8:
        raise CLIError("--crop must be >= 8")
    return run(args)


DESCRIPTION = __doc__.replace("``moceir demo``: ", "")
