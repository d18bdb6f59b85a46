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
import functools
import sys
from collections.abc import Callable

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


def _compare(
    label: str,
    op: Callable[..., torch.Tensor],
    inputs: list[torch.Tensor],
    backend: str,
    tol: tuple[float, float, float, float],
    failures: list[str],
) -> None:
    """Run ``op(*inputs, backend=...)`` with ``backend`` and the reference; compare the outputs
    (atol, rtol = tol[:2]) and every input's gradient (tol[2:]) in float32."""
    runs = []
    for b in (backend, "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = op(*leaves, backend=b)
        runs.append((out.float(), [g.float() for g in _grads(out, leaves, 1)]))
    (got, got_grads), (want, want_grads) = runs
    _close(f"{backend} {label}", got, want, tol[0], tol[1], failures)
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        _close(f"{backend} {label} grad{i}", g, w, tol[2], tol[3], failures)


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
        tol = (1e-6, 1e-5, 1e-5, 1e-4)
        x = torch.randn(batch, 7, 13, 21, generator=gen).to(device)
        y = torch.randn(batch * k, 7, 13, 21, generator=gen).to(device)
        _compare(f"dispatch B={batch}", functools.partial(dispatch, plan=plan), [x], backend, tol, failures)

        def combine_with_plan(y, gates, backend, plan=plan):
            return combine(y, plan, gates, backend=backend)

        _compare(f"combine B={batch}", combine_with_plan, [y, plan.gates], backend, tol, failures)

    # grouped_dwconv: 4 experts (widths 5, 16, 9, 33; kernels 3, 5, 7, 9), expert 1 empty.
    channels, kernel_sizes, rows = [5, 16, 9, 33], [3, 5, 7, 9], [2, 0, 1, 3]
    c_max = max(channels)
    offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], device=device)
    for dtype, atol, rtol in ((torch.float32, 1e-4, 1e-4), (torch.bfloat16, 5e-2, 2e-2)):
        tol = (atol, rtol, 10 * atol, 10 * rtol)
        x = torch.randn(sum(rows), c_max, 13, 21, generator=gen).to(device, dtype)
        per_expert = [
            torch.randn(c, 1, ks, ks, generator=gen) for c, ks in zip(channels, kernel_sizes, strict=True)
        ]
        weight = pack_dwconv_weights(per_expert)[0].to(device, dtype)
        bias = torch.randn(len(channels), c_max, generator=gen).to(device, dtype)
        _compare(
            f"grouped_dwconv {dtype}",
            lambda x, w, b, backend: grouped_dwconv(
                x, w, b, offsets, channels, kernel_sizes, backend=backend
            ),
            [x, weight, bias],
            backend,
            tol,
            failures,
        )
        for c in (7, 48):  # layernorm2d over 7 and 48 channels
            inputs = [
                torch.randn(shape, generator=gen).to(device, dtype) for shape in ((2, c, 13, 21), (c,), (c,))
            ]
            _compare(f"layernorm2d C={c} {dtype}", layernorm2d, inputs, backend, tol, failures)


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
