"""Bytes one MoCE-IR-S inference moves, per backend: the benchmarks' byte counter without timing.

Every op call's tensor inputs and outputs, counted once (``benchmarks.models.count_traffic``: a
dispatch mode; views excluded, an in-place output not counted twice). A lower bound on a GPU's
DRAM traffic when each kernel reads its inputs once: it says what a change of the kernels'
contracts (a fusion, a layout) saves, on any machine, with no GPU. It says nothing about how well
each kernel uses the bandwidth. The forward counted is the second one (a served model's: the
first builds what eval forwards keep, ``moceir.layers.packing_cache``); ``--cold`` counts the
first.

    python -m benchmarks.traffic --backends reference triton --precision bf16-autocast
    python -m benchmarks.traffic --backends triton --unfused-trunk    # the trunk without fusions
    python -m benchmarks.traffic --backends triton --composed-pairs   # qkv -> qkv_dwconv as one conv

On the CPU the Triton backend runs through the interpreter (set here when there is no GPU):
minutes at the default size.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

if not torch.cuda.is_available():
    # Before anything imports triton: its kernels run on the CPU through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moceir  # noqa: E402
from benchmarks.models import count_traffic  # noqa: E402
from moce_kernels import BACKENDS  # noqa: E402
from moceir.layers.adapter import EXPERT_PATHS  # noqa: E402
from moceir.layers.composed_conv import always_composed  # noqa: E402

PRECISIONS = ("float32", "bf16-autocast", "bfloat16")


def traffic(
    backend: str,
    precision: str,
    batch: int,
    size: int,
    expert_path: str,
    fused_trunk: bool,
    device: str,
    composed_pairs: bool = False,
    cold: bool = False,
) -> dict:
    """{"bytes", "calls", "top"} of one inference of MoCE-IR-S (seeded random weights and input)."""
    torch.manual_seed(0)
    model = moceir.build_model("moce_ir_s", backend=backend).to(device).eval()
    model.set_expert_path(expert_path).set_trunk_fusion(fused_trunk)
    x = torch.rand(batch, 3, size, size, device=device)
    if precision == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)

    autocast = precision == "bf16-autocast"

    def infer() -> None:
        with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            model(x)

    with always_composed() if composed_pairs else contextlib.nullcontext():
        if not cold:
            infer()
        moved, calls, top = count_traffic(infer)
    return {"bytes": moved, "calls": calls, "top": top}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["reference", "auto"], choices=BACKENDS)
    parser.add_argument("--precision", default="float32", choices=PRECISIONS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="height and width (default 64)")
    parser.add_argument("--expert-path", default="sync_free", choices=EXPERT_PATHS)
    parser.add_argument(
        "--unfused-trunk", action="store_true", help="model.set_trunk_fusion(False): no fused_pointwise"
    )
    parser.add_argument(
        "--composed-pairs",
        action="store_true",
        help="every attention 1x1 -> depthwise 3x3 pair as one dense convolution (composed_conv)",
    )
    parser.add_argument(
        "--cold", action="store_true", help="count the first forward (default: the second, warm one)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=5, help="ops listed per backend (by bytes)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.size < 1:
        parser.error("--batch and --size must be >= 1")
    print(
        f"MoCE-IR-S inference, batch {args.batch} at {args.size} x {args.size}, {args.precision}, "
        f"expert path {args.expert_path}, trunk fusion {'off' if args.unfused_trunk else 'on'}"
        f"{', attention pairs composed' if args.composed_pairs else ''}, {args.device}, "
        f"{'first (cold)' if args.cold else 'second (warm)'} forward"
    )
    for backend in args.backends:
        shape = (args.batch, args.size)
        fused, composed = not args.unfused_trunk, args.composed_pairs
        result = traffic(
            backend, args.precision, *shape, args.expert_path, fused, args.device, composed, args.cold
        )
        print(f"{backend:>10}: {result['bytes'] / 2**20:10.1f} MiB in {result['calls']} op calls")
        for row in result["top"][: args.top]:
            print(f"{'':12}{row['bytes'] / 2**20:10.1f} MiB  {row['op']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
