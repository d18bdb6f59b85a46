"""The ``moceir`` command line (``python -m moceir`` too)."""

from __future__ import annotations

import argparse
import sys

import torch

import moce_kernels
import moceir


def _info(_args: argparse.Namespace) -> None:
    print(f"moceir {moceir.__version__}, torch {torch.__version__}")
    print(moce_kernels.build_summary())
    print(f"CUDA available: {torch.cuda.is_available()}")
    for name in moceir.CONFIGS:
        n = sum(p.numel() for p in moceir.build_model(name).parameters())
        print(f"config {name}: {n:,} parameters")


def main(argv: list[str] | None = None) -> int:
    from moceir import demo  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="moceir", description="MoCE-IR all-in-one image restoration")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="restore the bundled degraded samples and show the routing")
    demo.add_arguments(p_demo)
    p_demo.set_defaults(func=lambda a: demo.run_demo(a.checkpoint, a.output_dir, a.backend, a.device))
    p_info = sub.add_parser("info", help="versions, what was compiled, configurations")
    p_info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
