"""What the subcommands share: devices, precision, loading a model for inference, errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import moce_kernels
import moceir
from moceir.config import CONFIGS

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

RANDOM_WEIGHTS_WARNING = """
+------------------------------------------------------------------------------+
| WARNING: no --checkpoint given: the model has RANDOM weights.                |
| The outputs are NOT restorations (only the routing and the timing are real). |
| Pass --checkpoint (official last.ckpt, .pt/.pth, .safetensors, or the folder |
| written by `moceir train`) for real restoration.                             |
+------------------------------------------------------------------------------+
""".strip("\n")


class CLIError(Exception):
    """A user error: printed as ``moceir <command>: error: <message>``, exit status 2."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; CLIError for a device that is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"unknown device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: torch sees no CUDA GPU here (use --device cpu)")
    return device


def resolve_checkpoint(path: str | Path) -> Path:
    """A weights file from what the user named: a file, a checkpoint folder written by
    ``moceir train`` (``model.safetensors`` inside), or a training output folder (its final or
    latest checkpoint)."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "model.safetensors", p / "final.safetensors"):
            if candidate.is_file():
                return candidate
        latest = p / "checkpoints" / "latest"
        if latest.is_file():
            target = p / "checkpoints" / latest.read_text().strip() / "model.safetensors"
            if target.is_file():
                return target
        raise CLIError(f"{p} is a folder without model.safetensors or checkpoints/latest: which weights?")
    if not p.is_file():
        raise CLIError(f"checkpoint not found: {p}")
    return p


def load_model(
    checkpoint: str | None,
    config: str = "moce_ir_s",
    backend: str = "auto",
    device: torch.device | None = None,
    precision: str = "fp32",
    quiet: bool = False,
) -> moceir.MoCEIR:
    """The model for inference, in eval mode on ``device`` (cast to ``precision``).

    With a checkpoint the architecture is inferred from the file; without, ``config`` is built
    with random weights and a loud warning goes to stderr. Raises CLIError for a missing,
    corrupt or foreign checkpoint and for a backend that cannot run here.
    """
    if checkpoint:
        path = resolve_checkpoint(checkpoint)
        try:
            model = moceir.load_checkpoint(path, backend="reference")
        except (ValueError, FileNotFoundError, OSError) as e:
            # The loader's messages already name the file; others get the path in front.
            where = "" if str(path) in str(e) else f" {path}"
            raise CLIError(f"cannot load checkpoint{where}: {e}") from e
    else:
        if not quiet:
            print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        torch.manual_seed(0)
        model = moceir.build_model(config, backend="reference")
    try:
        model.set_backend(backend)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--backend {backend}: {e}") from e
    model = model.to(device or "cpu").eval()
    if precision != "fp32":
        model = model.to(PRECISIONS[precision])
    return model


def add_model_arguments(parser: argparse.ArgumentParser, checkpoint_required: bool = False) -> None:
    """--checkpoint, --config, --device, --backend, --precision."""
    parser.add_argument(
        "--checkpoint",
        required=checkpoint_required,
        help="weights: official last.ckpt, .pt/.pth, .safetensors, or a `moceir train` output folder"
        + ("" if checkpoint_required else " (without it: RANDOM weights, with a warning)"),
    )
    if not checkpoint_required:
        parser.add_argument(
            "--config", default="moce_ir_s", choices=sorted(CONFIGS), help="architecture without --checkpoint"
        )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--backend", default="auto", choices=moce_kernels.BACKENDS, help="kernels the model runs with"
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=sorted(PRECISIONS),
        help="cast the model and images (GPU: bf16 is fast)",
    )
