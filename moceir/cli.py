"""The ``moceir`` command line (``python -m moceir`` too).

Subcommands: ``restore`` (your images), ``test`` (the paper's benchmarks), ``train`` (the paper's
recipe; multi-GPU with torchrun), ``demo`` (train, restore and show the routing in minutes on a
CPU), ``bench`` (kernel benchmarks, from a source checkout), ``info`` (versions, builds).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

import moce_kernels
import moceir
from moceir.runtime import CLIError

#: subcommand -> (module, one-line help)
COMMANDS = {
    "restore": ("moceir.restore", "restore image files/folders; PNGs + a report of the experts used"),
    "test": ("moceir.evaluate", "PSNR/SSIM on the paper's benchmarks (official dataset layouts)"),
    "train": ("moceir.train", "train with the paper's recipe (torchrun for several GPUs)"),
    "demo": ("moceir.demo", "train MoCE-IR-S briefly on synthetic degradations, restore, show the routing"),
    "bench": ("moceir.bench", "kernel and model benchmarks for the available backends"),
    "info": (None, "versions, what was compiled, configurations"),
}


def _info(_args: argparse.Namespace) -> int:
    print(f"moceir {moceir.__version__}, torch {torch.__version__}")
    print(moce_kernels.build_summary())
    print(f"CUDA available: {torch.cuda.is_available()}")
    for name in moceir.CONFIGS:
        n = sum(p.numel() for p in moceir.build_model(name).parameters())
        print(f"config {name}: {n:,} parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moceir",
        description="MoCE-IR all-in-one image restoration: restore, evaluate, train.",
        epilog="`moceir <command> --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"moceir {moceir.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if module is None:
            p = sub.add_parser(name, help=help_text, description=help_text)
            p.set_defaults(func=_info)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help_text,
            description=getattr(mod, "DESCRIPTION", help_text),
            epilog=getattr(mod, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":  # everything it does not know goes to the benchmark suite
        args.suite_args = [a for a in extra if a != "--"]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"moceir {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmoceir {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
