"""The full text of the compiled ops' argument-check errors (moce_kernels._C, CPU ops).

The checks build their messages without iostreams (csrc/check.h, MOCE_CHECK): a TORCH_CHECK
whose message streamed an integer or a shape crashed the whole process (SIGSEGV) with an
extension built by a GCC whose libstdc++ differed from the one loaded at run time. Each case
here pins the exact text (numbers, shapes as "[a, b, c]", dtypes, floats as printf %g), and
the cases run in a child process, so a crash fails these tests instead of killing pytest.
Skipped when the extension is not built.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.ops._helpers import ROOT, skip_unless_extension_built

skip_unless_extension_built()


def _layernorm2d_fwd(x=None, weight=None, bias=None, eps=1e-5):
    x = torch.randn(2, 3, 4, 5) if x is None else x
    weight = torch.randn(3) if weight is None else weight
    bias = torch.randn(3) if bias is None else bias
    return lambda: torch.ops.moce.layernorm2d_fwd(x, weight, bias, eps)


def _layernorm2d_bwd(**overrides):
    x = torch.randn(2, 3, 4, 5)
    args = dict(grad_y=torch.randn_like(x), x=x, weight=torch.randn(3), mean=torch.randn(2, 4, 5))
    args["rstd"] = torch.rand(2, 4, 5)
    args.update(overrides)
    return lambda: torch.ops.moce.layernorm2d_bwd(*args.values())


def _grouped_dwconv_fwd(**overrides):
    # E = 2 experts on C_max = 5 channels, K_max = 5, N = 6 rows of 7 x 7.
    args = dict(
        x=torch.randn(6, 5, 7, 7),
        weight=torch.randn(2, 5, 5, 5),
        bias=None,
        offsets=torch.tensor([0, 2, 6]),
        channels=[3, 5],
        kernel_sizes=[3, 5],
    )
    args.update(overrides)
    return lambda: torch.ops.moce.grouped_dwconv_fwd(*args.values())


def _grouped_dwconv_bwd(**overrides):
    x = torch.randn(6, 5, 7, 7)
    args = dict(
        grad_y=torch.randn_like(x),
        x=x,
        weight=torch.randn(2, 5, 5, 5),
        offsets=torch.tensor([0, 2, 6]),
        channels=[3, 5],
        kernel_sizes=[3, 5],
    )
    args.update(overrides)
    return lambda: torch.ops.moce.grouped_dwconv_bwd(*args.values())


def _dwconv_gelu_gate_fwd(**overrides):
    # B = 2 images of 2 * Ch = 4 channels, 5 x 5, K = 3.
    args = dict(x=torch.randn(2, 4, 5, 5), weight=torch.randn(4, 3, 3), bias=torch.randn(4))
    args.update(overrides)
    return lambda: torch.ops.moce.dwconv_gelu_gate_fwd(*args.values())


def _dwconv_gelu_gate_bwd(**overrides):
    args = dict(
        grad_y=torch.randn(2, 2, 5, 5), x=torch.randn(2, 4, 5, 5), weight=torch.randn(4, 3, 3), bias=None
    )
    args.update(overrides)
    return lambda: torch.ops.moce.dwconv_gelu_gate_bwd(*args.values())


def _route_fwd(logits=None, noise=None, k=2):
    logits = torch.randn(2, 4) if logits is None else logits
    return lambda: torch.ops.moce.route_fwd(logits, noise, k)


def _route_bwd(**overrides):
    _, experts, probs, noisy, *_ = torch.ops.moce.route_fwd(torch.randn(3, 4), None, 2)
    args = dict(noisy=noisy, probs=probs, experts=experts, grad_gates=None, grad_probs=None, grad_noisy=None)
    args.update(overrides)
    return lambda: torch.ops.moce.route_bwd(*args.values())


IDX = torch.tensor([0, 1, 2, 1, 0, 2])  # B = 3 images, k = 2: S = 6 slots


def _dispatch_fwd(x=None, sorted_images=IDX, inverse=IDX):
    x = torch.randn(3, 2) if x is None else x
    return lambda: torch.ops.moce.dispatch_fwd(x, sorted_images, inverse)


def _dispatch_bwd(grad_out=None, inverse=IDX, batch=3):
    grad_out = torch.randn(6, 2) if grad_out is None else grad_out
    return lambda: torch.ops.moce.dispatch_bwd(grad_out, inverse, batch)


SLOTS = torch.tensor([0, 1, 2, 3, 4, 5])


def _combine_fwd(**overrides):
    args = dict(y=torch.randn(6, 2), gates=torch.rand(3, 2), inverse=SLOTS, sorted_slots=SLOTS)
    args.update(overrides)
    return lambda: torch.ops.moce.combine_fwd(*args.values())


def _combine_bwd(**overrides):
    args = dict(grad_out=torch.randn(3, 2), y=torch.randn(6, 2), gates=torch.rand(3, 2))
    args.update(inverse=SLOTS, sorted_slots=SLOTS)
    args.update(overrides)
    return lambda: torch.ops.moce.combine_bwd(*args.values())


#: id -> (the call, when the child process runs it; the exact message it must raise).
CASES = {
    # layernorm2d
    "ln-x-3d": (
        lambda: _layernorm2d_fwd(x=torch.randn(2, 3, 4)),
        "moce::layernorm2d_fwd: x must be a 4-D [B, C, H, W] tensor, got shape [2, 3, 4]",
    ),
    "ln-C0": (
        lambda: _layernorm2d_fwd(x=torch.randn(2, 0, 4, 5)),
        "moce::layernorm2d_fwd: x must have at least one channel (C >= 1), got shape [2, 0, 4, 5]",
    ),
    "ln-weight-shape": (
        lambda: _layernorm2d_fwd(weight=torch.randn(4)),
        "moce::layernorm2d_fwd: weight must have shape [C] = [3] (C = x.size(1)), got shape [4]",
    ),
    "ln-bias-2d": (
        lambda: _layernorm2d_fwd(bias=torch.randn(3, 1)),
        "moce::layernorm2d_fwd: bias must have shape [C] = [3] (C = x.size(1)), got shape [3, 1]",
    ),
    "ln-x-int": (
        lambda: _layernorm2d_fwd(x=torch.ones(2, 3, 4, 5, dtype=torch.int32)),
        "moce::layernorm2d_fwd: x must be float32, float64, bfloat16 or float16, got Int",
    ),
    "ln-eps-nan": (
        lambda: _layernorm2d_fwd(eps=float("nan")),
        "moce::layernorm2d_fwd: eps must be finite and > 0, got nan",
    ),
    "ln-eps-inf": (
        lambda: _layernorm2d_fwd(eps=float("inf")),
        "moce::layernorm2d_fwd: eps must be finite and > 0, got inf",
    ),
    "ln-eps-negative": (
        lambda: _layernorm2d_fwd(eps=-2.5e-7),
        "moce::layernorm2d_fwd: eps must be finite and > 0, got -2.5e-07",
    ),
    "ln-eps-zero": (
        lambda: _layernorm2d_fwd(eps=0.0),
        "moce::layernorm2d_fwd: eps must be finite and > 0, got 0",
    ),
    "ln-bwd-grad-shape": (
        lambda: _layernorm2d_bwd(grad_y=torch.randn(2, 3, 4, 6)),
        "moce::layernorm2d_bwd: grad_y must have the shape of x ([2, 3, 4, 5]), got [2, 3, 4, 6]",
    ),
    "ln-bwd-grad-dtype": (
        lambda: _layernorm2d_bwd(grad_y=torch.randn(2, 3, 4, 5, dtype=torch.float64)),
        "moce::layernorm2d_bwd: grad_y must have the dtype of x (Float), got Double",
    ),
    "ln-bwd-mean-shape": (
        lambda: _layernorm2d_bwd(mean=torch.randn(2, 4)),
        "moce::layernorm2d_bwd: mean must have shape [B, H, W] = [2, 4, 5], got [2, 4]",
    ),
    "ln-bwd-rstd-dtype": (
        lambda: _layernorm2d_bwd(rstd=torch.rand(2, 4, 5, dtype=torch.float64)),
        "moce::layernorm2d_bwd: rstd must have dtype Float (the statistics dtype of a Float input), "
        "got Double",
    ),
    # grouped_dwconv
    "dw-x-3d": (
        lambda: _grouped_dwconv_fwd(x=torch.randn(2, 3, 4)),
        "moce::grouped_dwconv_fwd: x must be a 4-D [N, C_max, H, W] tensor, got shape [2, 3, 4]",
    ),
    "dw-weight-cmax": (
        lambda: _grouped_dwconv_fwd(weight=torch.randn(2, 4, 5, 5)),
        "moce::grouped_dwconv_fwd: weight must have shape [E, C_max, K_max, K_max] with E >= 1 and C_max = 5"
        " (x.size(1)), got shape [2, 4, 5, 5]",
    ),
    "dw-weight-even": (
        lambda: _grouped_dwconv_fwd(weight=torch.randn(2, 5, 4, 4)),
        "moce::grouped_dwconv_fwd: weight's window K_max must be odd, got 4",
    ),
    "dw-bias-shape": (
        lambda: _grouped_dwconv_fwd(bias=torch.randn(2, 4)),
        "moce::grouped_dwconv_fwd: bias must have shape [E, C_max] = [2, 5], got shape [2, 4]",
    ),
    "dw-offsets-len": (
        lambda: _grouped_dwconv_fwd(offsets=torch.tensor([0, 6])),
        "moce::grouped_dwconv_fwd: offsets must have shape [E + 1] = [3] (E = weight.size(0)), got shape [2]",
    ),
    "dw-offsets-end": (
        lambda: _grouped_dwconv_fwd(offsets=torch.tensor([0, 2, 5])),
        "moce::grouped_dwconv_fwd: offsets must rise from 0 to N = 6, got [0, 2, 5]",
    ),
    "dw-offsets-down": (
        lambda: _grouped_dwconv_fwd(offsets=torch.tensor([0, 7, 6], dtype=torch.int32)),
        "moce::grouped_dwconv_fwd: offsets must be non-decreasing, got [0, 7, 6]",
    ),
    "dw-channels-len": (
        lambda: _grouped_dwconv_fwd(channels=[3]),
        "moce::grouped_dwconv_fwd: channels must have E = 2 entries (E = weight.size(0)), got 1",
    ),
    "dw-channels-above": (
        lambda: _grouped_dwconv_fwd(channels=[3, 6]),
        "moce::grouped_dwconv_fwd: channels[1] must be in 1..C_max = 1..5, got 6",
    ),
    "dw-kernel-above": (
        lambda: _grouped_dwconv_fwd(kernel_sizes=[3, 7]),
        "moce::grouped_dwconv_fwd: kernel_sizes[1] must be odd, in 1..9 and <= K_max = 5, got 7",
    ),
    "dw-bwd-grad-shape": (
        lambda: _grouped_dwconv_bwd(grad_y=torch.randn(6, 5, 7, 6)),
        "moce::grouped_dwconv_bwd: grad_y must have the shape of x ([6, 5, 7, 7]), got [6, 5, 7, 6]",
    ),
    # dwconv_gelu_gate
    "gate-x-3d": (
        lambda: _dwconv_gelu_gate_fwd(x=torch.randn(2, 4, 5)),
        "moce::dwconv_gelu_gate_fwd: x must be a 4-D [B, 2 * Ch, H, W] tensor, got shape [2, 4, 5]",
    ),
    "gate-x-odd-channels": (
        lambda: _dwconv_gelu_gate_fwd(x=torch.randn(2, 3, 5, 5)),
        "moce::dwconv_gelu_gate_fwd: x must have an even channel count 2 * Ch >= 2 (the gate's two halves), "
        "got shape [2, 3, 5, 5]",
    ),
    "gate-x-no-channels": (
        lambda: _dwconv_gelu_gate_fwd(x=torch.randn(2, 0, 5, 5)),
        "moce::dwconv_gelu_gate_fwd: x must have an even channel count 2 * Ch >= 2 (the gate's two halves), "
        "got shape [2, 0, 5, 5]",
    ),
    "gate-x-int": (
        lambda: _dwconv_gelu_gate_fwd(x=torch.ones(2, 4, 5, 5, dtype=torch.int64)),
        "moce::dwconv_gelu_gate_fwd: x must be float32, float64, bfloat16 or float16, got Long",
    ),
    "gate-weight-channels": (
        lambda: _dwconv_gelu_gate_fwd(weight=torch.randn(2, 3, 3)),
        "moce::dwconv_gelu_gate_fwd: weight must have shape [2 * Ch, K, K] with 2 * Ch = 4 (x.size(1)), "
        "got shape [2, 3, 3]",
    ),
    "gate-weight-even": (
        lambda: _dwconv_gelu_gate_fwd(weight=torch.randn(4, 4, 4)),
        "moce::dwconv_gelu_gate_fwd: weight's kernel size K must be odd, in 1..9, got 4",
    ),
    "gate-weight-11": (
        lambda: _dwconv_gelu_gate_fwd(weight=torch.randn(4, 11, 11)),
        "moce::dwconv_gelu_gate_fwd: weight's kernel size K must be odd, in 1..9, got 11",
    ),
    "gate-weight-dtype": (
        lambda: _dwconv_gelu_gate_fwd(weight=torch.randn(4, 3, 3, dtype=torch.float64)),
        "moce::dwconv_gelu_gate_fwd: weight must have the dtype of x (Float), got Double",
    ),
    "gate-bias-shape": (
        lambda: _dwconv_gelu_gate_fwd(bias=torch.randn(2, 2)),
        "moce::dwconv_gelu_gate_fwd: bias must have shape [2 * Ch] = [4], got shape [2, 2]",
    ),
    "gate-bias-dtype": (
        lambda: _dwconv_gelu_gate_fwd(bias=torch.randn(4, dtype=torch.bfloat16)),
        "moce::dwconv_gelu_gate_fwd: bias must have the dtype of x (Float), got BFloat16",
    ),
    "gate-bwd-grad-shape": (
        lambda: _dwconv_gelu_gate_bwd(grad_y=torch.randn(2, 4, 5, 5)),
        "moce::dwconv_gelu_gate_bwd: grad_y must have shape [B, Ch, H, W] = [2, 2, 5, 5], got [2, 4, 5, 5]",
    ),
    "gate-bwd-grad-dtype": (
        lambda: _dwconv_gelu_gate_bwd(grad_y=torch.randn(2, 2, 5, 5, dtype=torch.float16)),
        "moce::dwconv_gelu_gate_bwd: grad_y must have the dtype of x (Float), got Half",
    ),
    "gate-bwd-weight-even": (
        lambda: _dwconv_gelu_gate_bwd(weight=torch.randn(4, 2, 2)),
        "moce::dwconv_gelu_gate_bwd: weight's kernel size K must be odd, in 1..9, got 2",
    ),
    # route
    "route-logits-1d": (
        lambda: _route_fwd(logits=torch.randn(4)),
        "moce::route_fwd: logits must be a 2-D [B, E] tensor, got shape [4]",
    ),
    "route-E0": (
        lambda: _route_fwd(logits=torch.randn(2, 0), k=1),
        "moce::route_fwd: logits must have at least one expert column (E >= 1), got shape [2, 0]",
    ),
    "route-k": (
        lambda: _route_fwd(k=5),
        "moce::route_fwd: k must be in 1..E = 1..4, got 5",
    ),
    "route-noise-shape": (
        lambda: _route_fwd(noise=torch.randn(2, 3)),
        "moce::route_fwd: noise must have shape [B, E] = [2, 4], got shape [2, 3]",
    ),
    "route-bwd-experts": (
        lambda: _route_bwd(experts=torch.zeros(2, 2, dtype=torch.int64)),
        "moce::route_bwd: experts must have shape [B, k] with B = 3, got shape [2, 2]",
    ),
    "route-bwd-grad-gates": (
        lambda: _route_bwd(grad_gates=torch.randn(3, 3)),
        "moce::route_bwd: grad_gates must have shape [B, k] = [3, 2], got shape [3, 3]",
    ),
    "route-bwd-probs-dtype": (
        lambda: _route_bwd(probs=torch.rand(3, 4, dtype=torch.float64)),
        "moce::route_bwd: probs must be float32, got Double",
    ),
    # dispatch
    "dispatch-images-2d": (
        lambda: _dispatch_fwd(sorted_images=torch.zeros(2, 3, dtype=torch.int64)),
        "moce::dispatch_fwd: sorted_images must be a 1-D [S] tensor, got shape [2, 3]",
    ),
    "dispatch-inverse-len": (
        lambda: _dispatch_fwd(inverse=IDX[:5]),
        "moce::dispatch_fwd: inverse must have shape [S] = [6], got shape [5]",
    ),
    "dispatch-S-not-multiple-of-B": (
        lambda: _dispatch_fwd(x=torch.randn(4, 2)),
        "moce::dispatch_fwd: the plan's S = 6 slots must be a multiple of the batch size B = 4 (S = B * k)",
    ),
    "dispatch-oob": (
        lambda: _dispatch_fwd(sorted_images=torch.tensor([0, 1, 3, 1, 0, 2])),
        "moce::dispatch_fwd: sorted_images[2] = 3 is out of range [0, 3)",
    ),
    "dispatch-bwd-batch": (
        lambda: _dispatch_bwd(batch=-1),
        "moce::dispatch_bwd: batch must be >= 0, got -1",
    ),
    # combine
    "combine-gates-B": (
        lambda: _combine_fwd(gates=torch.rand(2, 2)),
        "moce::combine_fwd: gates must have shape [B, k] with B * k = S = 6 (y.size(0)), got shape [2, 2]",
    ),
    "combine-inverse-len": (
        lambda: _combine_fwd(inverse=SLOTS[:5]),
        "moce::combine_fwd: inverse must have shape [S] = [6] (S = y.size(0)), got shape [5]",
    ),
    "combine-oob": (
        lambda: _combine_fwd(inverse=torch.tensor([0, 1, 2, 3, 4, 6])),
        "moce::combine_fwd: inverse[5] = 6 is out of range [0, 6)",
    ),
    "combine-bwd-grad-shape": (
        lambda: _combine_bwd(grad_out=torch.randn(3, 3)),
        "moce::combine_bwd: grad_out must have shape [3, 2] ([B, ...] with y's feature shape), got [3, 3]",
    ),
}


def _run_cases() -> None:
    """In the child process: run every case, print {id: [exception type or null, message]}."""
    import moce_kernels._C  # noqa: F401, PLC0415  (registers the ops)

    results = {}
    for case_id, (make, _) in CASES.items():
        call = make()
        try:
            call()
        except Exception as e:  # noqa: BLE001  (the type is part of the result)
            results[case_id] = [type(e).__name__, str(e)]
        else:
            results[case_id] = [None, ""]
    print(json.dumps(results))


@pytest.fixture(scope="module")
def results():
    code = "import tests.ops.test_compiled_messages as m; m._run_cases()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, (
        f"the child process running the failing checks died (exit code {proc.returncode}):\n"
        f"{proc.stderr[-4000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", list(CASES))
def test_check_message(results, case_id):
    expected = CASES[case_id][1]
    assert results[case_id] == ["RuntimeError", expected]
