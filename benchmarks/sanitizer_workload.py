"""Every CUDA-capable op, forward and backward, once per backend, at small odd shapes: the
workload ``compute-sanitizer --tool memcheck`` runs in the device check.

Shapes are chosen to hit the edges: B = 1 and B = 5, H x W = 13 x 21 (not a multiple of any
tile), an expert with no images, every kernel size 3..9, channels that are not a multiple of
a block. Each result is also compared with the reference, so a kernel that reads out of bounds
and happens to get zeros still shows up as a wrong number.

    python -m benchmarks.sanitizer_workload [--backends cuda,triton]
"""

from __future__ import annotations

import argparse
import sys

import torch

from moce_kernels import (
    combine,
    dispatch,
    grouped_dwconv,
    layernorm2d,
    pack_dwconv_weights,
    route,
)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return list(torch.autograd.grad(out, inputs, g))


def _close(name: str, got, want, atol: float, rtol: float, failures: list[str]) -> None:
    try:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    except AssertionError as e:
        failures.append(f"{name}: {str(e).splitlines()[0]}")


def check(backend: str, device: torch.device, failures: list[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    for batch, k in ((1, 1), (5, 2)):
        num_experts = 4
        logits = torch.randn(batch, num_experts, generator=gen).to(device)
        logits[:, 2] = -30.0  # expert 2 gets no images
        plan = route(logits, k, backend=backend)
        ref_plan = route(logits, k, backend="reference")
        for field in ("experts", "counts", "offsets", "sorted_slots", "inverse"):
            if not torch.equal(getattr(plan, field), getattr(ref_plan, field)):
                failures.append(f"{backend} route B={batch} k={k}: {field} differs")
        x = torch.randn(batch, 7, 13, 21, generator=gen).to(device).requires_grad_()
        gates = plan.gates.clone().requires_grad_()
        for name, fn in (("dispatch", dispatch), ("combine", None)):
            if fn is dispatch:
                outs = [dispatch(x, plan, backend=b) for b in (backend, "reference")]
                grads = [_grads(o, [x], 1) for o in outs]
            else:
                y = torch.randn(batch * k, 7, 13, 21, generator=gen).to(device).requires_grad_()
                outs = [combine(y, plan, gates, backend=b) for b in (backend, "reference")]
                grads = [_grads(o, [y, gates], 2) for o in outs]
            _close(f"{backend} {name} B={batch}", outs[0], outs[1], 1e-6, 1e-5, failures)
            for i, (a, b) in enumerate(zip(*grads, strict=True)):
                _close(f"{backend} {name} B={batch} grad{i}", a, b, 1e-5, 1e-4, failures)

    # grouped_dwconv: 4 experts (widths 5, 16, 9, 33; kernels 3, 5, 7, 9), expert 1 empty.
    channels, kernel_sizes, rows = [5, 16, 9, 33], [3, 5, 7, 9], [2, 0, 1, 3]
    c_max = max(channels)
    offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], device=device)
    for dtype, atol, rtol in ((torch.float32, 1e-4, 1e-4), (torch.bfloat16, 5e-2, 2e-2)):
        x = torch.randn(sum(rows), c_max, 13, 21, generator=gen).to(device, dtype)
        per_expert = [
            torch.randn(c, 1, ks, ks, generator=gen) for c, ks in zip(channels, kernel_sizes, strict=True)
        ]
        weight, _, _, _ = pack_dwconv_weights(per_expert)
        weight = weight.to(device, dtype)
        bias = torch.randn(len(channels), c_max, generator=gen).to(device, dtype)
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        outs, grads = [], []
        for b in (backend, "reference"):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = grouped_dwconv(*leaves, offsets, channels, kernel_sizes, backend=b)
            outs.append(out.float())
            grads.append([g.float() for g in _grads(out, leaves, 3)])
        _close(f"{backend} grouped_dwconv {dtype}", outs[0], outs[1], atol, rtol, failures)
        for i, (a, b) in enumerate(zip(*grads, strict=True)):
            _close(f"{backend} grouped_dwconv {dtype} grad{i}", a, b, 10 * atol, 10 * rtol, failures)

        # layernorm2d over 7 and 48 channels
        for c in (7, 48):
            x = torch.randn(2, c, 13, 21, generator=gen).to(device, dtype)
            w = torch.randn(c, generator=gen).to(device, dtype)
            bvec = torch.randn(c, generator=gen).to(device, dtype)
            outs, grads = [], []
            for b in (backend, "reference"):
                leaves = [t.clone().requires_grad_() for t in (x, w, bvec)]
                out = layernorm2d(*leaves, backend=b)
                outs.append(out.float())
                grads.append([g.float() for g in _grads(out, leaves, 4)])
            _close(f"{backend} layernorm2d C={c} {dtype}", outs[0], outs[1], atol, rtol, failures)
            for i, (a, b) in enumerate(zip(*grads, strict=True)):
                _close(f"{backend} layernorm2d C={c} {dtype} grad{i}", a, b, 10 * atol, 10 * rtol, failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda,triton", help="comma-separated backends to run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 3
    device = torch.device("cuda")
    failures: list[str] = []
    for backend in args.backends.split(","):
        try:
            check(backend, device, failures)
        except Exception as e:  # noqa: BLE001  (report every backend)
            failures.append(f"{backend}: {type(e).__name__}: {e}"[:400])
        torch.cuda.synchronize()
        print(f"{backend}: done", flush=True)
    for f in failures:
        print("FAIL", f)
    print(f"sanitizer workload: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
