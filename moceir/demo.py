"""The README demo: MoCE-IR-S restores the bundled degraded samples in one batch.

Prints, per image, the expert chosen in each decoder block (grouped by decoder level) and the
time taken. Without ``--checkpoint`` the weights are random: the routing and timing are real,
the "restoration" is not.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import moce_kernels
import moceir
from moceir.samples import degraded_samples, load_image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio  # noqa: PLC0415

    return float(peak_signal_noise_ratio(b, np.clip(a, 0, 1), data_range=1.0))


def level_choices(model: moceir.MoCEIR, image: int) -> list[str]:
    """Experts chosen for ``image`` in each decoder block, one string per decoder level."""
    choices = model.routing_choices()
    levels, start = [], 0
    for n in model.config.num_dec_blocks:
        picks = [",".join(str(int(e)) for e in c[image]) for c in choices[start : start + n]]
        levels.append(" ".join(picks))
        start += n
    return levels


def run_demo(checkpoint: str | None, output_dir: Path, backend: str, device: str) -> None:
    samples = degraded_samples()
    if not samples:
        raise SystemExit("no sample images found under moceir/assets/samples")
    torch.manual_seed(0)  # random weights (without a checkpoint) are the same every run
    model = moceir.build_model("moce_ir_s", backend=backend)
    if checkpoint:
        moceir.load_checkpoint(model, checkpoint)
    model = model.to(device).eval()
    print(moce_kernels.build_summary())
    print(
        f"model: MoCE-IR-S ({sum(p.numel() for p in model.parameters()):,} parameters), backend={backend}, "
        f"device={device}, weights: {checkpoint or 'random (pass --checkpoint for real restoration)'}"
    )

    degraded = [load_image(p) for _, p, _ in samples]
    clean = [load_image(c) for _, _, c in samples]
    batch = torch.from_numpy(np.stack(degraded)).permute(0, 3, 1, 2).contiguous().to(device)
    with torch.inference_mode():
        model(batch)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        restored = model(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    out = restored.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    output_dir.mkdir(parents=True, exist_ok=True)
    h, w = batch.shape[-2:]
    print(
        f"\nrestored {len(samples)} images of {h}x{w} in one batch: {elapsed * 1000:.0f} ms "
        f"({elapsed * 1000 / len(samples):.0f} ms per image)"
    )
    dec_names = [f"dec.{i} ({n} blocks)" for i, n in enumerate(model.config.num_dec_blocks)]
    print("experts chosen per decoder block (0 = cheapest ... 3 = widest), deepest level first:")
    header = f"{'image':<20} " + " | ".join(f"{d:<15}" for d in dec_names) + " | PSNR in -> out"
    print(header)
    print("-" * len(header))
    for i, (name, _, _) in enumerate(samples):
        levels = " | ".join(f"{s:<15}" for s in level_choices(model, i))
        print(f"{name:<20} {levels} | {psnr(degraded[i], clean[i]):5.2f} -> {psnr(out[i], clean[i]):5.2f} dB")
        Image.fromarray(np.round(out[i] * 255).astype(np.uint8)).save(output_dir / f"{name}_restored.png")
    print(f"\nwrote {len(samples)} restored images to {output_dir}/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", help="official last.ckpt, .pt/.pth or .safetensors weights of MoCE-IR-S"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"), help="where restored PNGs go")
    parser.add_argument("--backend", default="auto", choices=moce_kernels.BACKENDS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moceir demo", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_demo(args.checkpoint, args.output_dir, args.backend, args.device)


if __name__ == "__main__":
    main()
