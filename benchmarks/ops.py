"""Op benchmarks: one setup per op of the contract, every available provider, three modes.

Shapes are MoCE-IR-S's at training time (batch 8, 128 x 128 crops): decoder levels ``dec0``,
``dec1``, ``dec2`` of widths 128, 64, 32 at 32, 64, 128 px; the experts' ranks C/8, C/4, C/2, C
and patch sizes 4, 8, 16, 32; routing with k = 1 and the spread a complexity-biased router gives
(3, 2, 2, 1 of the 8 images on the experts, cheapest first).

Modes: ``forward`` (no autograd: the kernel alone), ``backward`` (the gradients of every input
from a retained graph), ``full`` (forward with autograd + backward). Bytes are the fewest a
kernel must move: each input it needs read once, each output written once (``bytes_moved``
below, per op); achieved GB/s and the fraction of the roofline follow from the ceilings
measured in the same run. Each provider's forward output and gradients are compared with the
reference's (``rel_err``: ||got - ref|| / ||ref||), so a fast wrong kernel shows up in the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import moce_kernels
from benchmarks.common import (
    OPS,
    Deadline,
    measure,
    nbytes,
    op_providers,
    rel_error,
    roofline_ms,
)
from moce_kernels.dwconv_gate_pointwise import dwconv_gate_pointwise
from moce_kernels.dwconv_gelu_gate import dwconv_gelu_gate
from moce_kernels.grouped_layernorm2d import grouped_layernorm2d
from moce_kernels.grouped_pointwise import grouped_pointwise
from moceir.config import CONFIGS

NUM_EXPERTS = 4
#: Expert of each of the 8 images (k = 1): counts 3, 2, 2, 1, cheapest expert most used.
CHOICES = (0, 1, 0, 2, 3, 0, 1, 2)
PATCH_SIZES = (4, 8, 16, 32)
MODES = ("forward", "backward", "full")


@dataclass
class Sizes:
    """Batch and decoder levels {name: (width C, side S)} of one benchmark size; ``expert_width``:
    the C whose experts' ranks C/8 .. C the sync-free expert path's LayerNorm runs over."""

    batch: int
    levels: dict[str, tuple[int, int]]
    quick: bool = False
    expert_width: int = 96


SIZES = {
    "full": Sizes(8, {"dec0": (128, 32), "dec1": (64, 64), "dec2": (32, 128)}),
    "quick": Sizes(8, {"dec2": (32, 128)}, quick=True),
    "tiny": Sizes(2, {"dec2": (8, 16)}, quick=True, expert_width=8),
}


@dataclass
class Bench:
    """One op at one shape: how to run it per provider, and what it reads and writes."""

    op: str
    case: str
    shape: list[int]
    #: forward(provider) -> outputs; runs with autograd when inputs require grad.
    forward: Callable[[str], object]
    #: the differentiable outputs of forward's result.
    diff_outputs: Callable[[object], list[torch.Tensor]]
    #: every output of forward's result, to compare with the reference.
    all_outputs: Callable[[object], list[torch.Tensor]]
    inputs: list[torch.Tensor]
    bytes_moved: dict[str, int]
    flops: dict[str, float] = field(default_factory=dict)


def routing_logits(batch: int, device: torch.device) -> torch.Tensor:
    """[B, E] logits whose top-1 is CHOICES (repeated), separated by a clear margin."""
    gen = torch.Generator().manual_seed(0)
    logits = -torch.rand(batch, NUM_EXPERTS, generator=gen)
    for b in range(batch):
        logits[b, CHOICES[b % len(CHOICES)]] = 2.0 + 0.5 * float(torch.rand((), generator=gen))
    return logits.to(device)


def _plan(batch: int, device: torch.device) -> moce_kernels.RoutingPlan:
    return moce_kernels.route(routing_logits(batch, device), 1, backend="reference")


def _rand(shape, device, dtype, grad=True) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=torch.float32).to(dtype).requires_grad_(grad)


def _full_flops(fwd: float, bwd: float) -> dict[str, float]:
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}


def _with_full(fwd: int, bwd: int) -> dict[str, int]:
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}


def bench_route(sizes: Sizes, device, dtype) -> list[Bench]:
    batch = sizes.batch
    logits = routing_logits(batch, device).to(dtype).requires_grad_(True)
    noise = (torch.randn(batch, NUM_EXPERTS, device=device) / NUM_EXPERTS).to(dtype)
    ref = moce_kernels.route(logits.detach(), 1, noise, backend="reference")
    plan_bytes = nbytes(*ref)
    gates = ref.gates
    return [
        Bench(
            op="route",
            case=f"b{batch}.e{NUM_EXPERTS}.k1",
            shape=[batch, NUM_EXPERTS],
            forward=lambda p: moce_kernels.route(logits, 1, noise, backend=p),
            diff_outputs=lambda plan: [plan.gates],
            all_outputs=list,
            inputs=[logits],
            # forward: logits + noise in, the plan out; backward: gate grads, logits, noise and
            # the chosen experts in (softmax recomputed), logit grads out.
            bytes_moved=_with_full(
                nbytes(logits, noise) + plan_bytes,
                nbytes(gates, logits, noise, ref.experts) + nbytes(logits),
            ),
        )
    ]


def bench_dispatch(sizes: Sizes, device, dtype) -> list[Bench]:
    plan = _plan(sizes.batch, device)
    out = []
    for level, (width, side) in sizes.levels.items():
        x = _rand((sizes.batch, width, side, side), device, dtype)
        out.append(
            Bench(
                op="dispatch",
                case=level,
                shape=list(x.shape),
                forward=lambda p, x=x: moce_kernels.dispatch(x, plan, backend=p),
                diff_outputs=lambda y: [y],
                all_outputs=lambda y: [y],
                inputs=[x],
                # B * k rows gathered (k = 1): read x, write as much; backward the same, reversed.
                bytes_moved=_with_full(2 * nbytes(x), 2 * nbytes(x)),
            )
        )
    return out


def bench_combine(sizes: Sizes, device, dtype) -> list[Bench]:
    plan = _plan(sizes.batch, device)
    out = []
    for level, (width, side) in sizes.levels.items():
        y = _rand((sizes.batch, width, side, side), device, dtype)
        gates = plan.gates.detach().to(dtype).clone().requires_grad_(True)
        out.append(
            Bench(
                op="combine",
                case=level,
                shape=list(y.shape),
                forward=lambda p, y=y, gates=gates: moce_kernels.combine(y, plan, gates, backend=p),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[y, gates],
                # forward: y and gates in, out; backward: grad_out and y in (gate grads), grad_y out.
                bytes_moved=_with_full(2 * nbytes(y) + nbytes(gates), 3 * nbytes(y) + 2 * nbytes(gates)),
            )
        )
    return out


def bench_dwconv_gelu_gate(sizes: Sizes, device, dtype) -> list[Bench]:
    """The trunk's GDFN middle at each level (width C, side S): the 3x3 depthwise conv over
    2 * hidden channels and gelu(x1) * x2, hidden = int(C * ffn_expansion) (MoCE-IR-S: C = 32,
    64, 128 at 128, 64, 32 px, expansion 2: 128, 256, 512 channels in), with bias."""
    expansion = CONFIGS["moce_ir_s"].ffn_expansion
    out = []
    for level, (width, side) in sizes.levels.items():
        channels = 2 * int(width * expansion)
        x = _rand((sizes.batch, channels, side, side), device, dtype)
        w = (torch.randn(channels, 3, 3, device=device) / 3).to(dtype).requires_grad_(True)
        b = torch.randn(channels, device=device).to(dtype).requires_grad_(True)
        params, gate_bytes = nbytes(w, b), nbytes(x) // 2
        # The fewest bytes: forward reads x once and writes the gate (half x's channels);
        # backward reads grad_out and x, writes grad x (the fused kernels recompute the
        # convolution, so its 2 * hidden-channel output is never stored or read).
        fwd_bytes = nbytes(x) + params + gate_bytes
        bwd_bytes = gate_bytes + 2 * nbytes(x) + 2 * params
        fwd_flops = 2 * 9 * x.numel()
        out.append(
            Bench(
                op="dwconv_gelu_gate",
                case=f"{level}.ffn3",
                shape=list(x.shape),
                forward=lambda p, x=x, w=w, b=b: dwconv_gelu_gate(x, w, b, backend=p),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[x, w, b],
                bytes_moved=_with_full(fwd_bytes, bwd_bytes),
                flops=_full_flops(fwd_flops, 2 * fwd_flops),
            )
        )
    return out


def bench_dwconv_gate_pointwise(sizes: Sizes, device, dtype) -> list[Bench]:
    """The trunk's GDFN after project_in at each level: the 3x3 depthwise conv over 2 * hidden
    channels, gelu(x1) * x2 and project_out (hidden -> C) with the block's skip added, biases on
    (MoCE-IR-S: 128 -> 32, 256 -> 64, 512 -> 128 channels at 128, 64, 32 px)."""
    expansion = CONFIGS["moce_ir_s"].ffn_expansion
    out = []
    for level, (width, side) in sizes.levels.items():
        hidden = int(width * expansion)
        x = _rand((sizes.batch, 2 * hidden, side, side), device, dtype)
        dw = (torch.randn(2 * hidden, 3, 3, device=device) / 3).to(dtype).requires_grad_(True)
        db = torch.randn(2 * hidden, device=device).to(dtype).requires_grad_(True)
        w = (torch.randn(width, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_(True)
        b = (0.1 * torch.randn(width, device=device)).to(dtype).requires_grad_(True)
        residual = _rand((sizes.batch, width, side, side), device, dtype)
        params, y_bytes = nbytes(dw, db, w, b), nbytes(residual)
        # The fewest bytes: forward reads x and the residual once and writes y (neither the
        # convolution's output nor the gate goes to memory); backward reads grad y and x, writes
        # grad x (the gate is recomputed; its gradient's write and read are the unfused
        # backward's and not counted: a lower bound).
        fwd_bytes = nbytes(x) + y_bytes + y_bytes + params
        bwd_bytes = y_bytes + 2 * nbytes(x) + 2 * params
        fwd_flops = 2 * 9 * x.numel() + 2 * (x.numel() // 2) * width
        out.append(
            Bench(
                op="dwconv_gate_pointwise",
                case=f"{level}.ffn_tail",
                shape=list(x.shape),
                forward=lambda p, x=x, dw=dw, db=db, w=w, b=b, r=residual: dwconv_gate_pointwise(
                    x, dw, db, w, b, residual=r, backend=p
                ),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[x, dw, db, w, b, residual],
                bytes_moved=_with_full(fwd_bytes, bwd_bytes),
                flops=_full_flops(fwd_flops, 2 * fwd_flops),
            )
        )
    return out


def _dwconv_bench(
    name: str, batch_rows: list[int], channels: list[int], kernel_sizes: list[int], side: int, device, dtype
) -> Bench:
    c_max, rows = max(channels), sum(batch_rows)
    weights = [torch.randn(c, 1, k, k) / k for c, k in zip(channels, kernel_sizes, strict=True)]
    biases = [torch.randn(c) for c in channels]
    w, b, chans, ks = moce_kernels.pack_dwconv_weights(weights, biases)
    w = w.to(device=device, dtype=dtype).requires_grad_(True)
    b = b.to(device=device, dtype=dtype).requires_grad_(True)
    offsets = torch.tensor([0, *torch.tensor(batch_rows).cumsum(0).tolist()], device=device)
    x = _rand((rows, c_max, side, side), device, dtype)
    el = x.element_size()
    plane = side * side
    # The rows' own channels are read; the whole output is written (channels past an expert's
    # width are zeros by contract). Backward reads grad_out and x on the active channels and
    # writes every input gradient.
    active = sum(n * c for n, c in zip(batch_rows, channels, strict=True)) * plane * el
    full_out = x.numel() * el
    params = nbytes(w, b)
    fwd_flops = sum(
        2 * k * k * n * c * plane for n, c, k in zip(batch_rows, channels, kernel_sizes, strict=True)
    )
    return Bench(
        op="grouped_dwconv",
        case=name,
        shape=list(x.shape),
        forward=lambda p: moce_kernels.grouped_dwconv(x, w, b, offsets, chans, ks, backend=p),
        diff_outputs=lambda o: [o],
        all_outputs=lambda o: [o],
        inputs=[x, w, b],
        bytes_moved=_with_full(active + params + full_out, 2 * active + params + full_out + params),
        flops=_full_flops(fwd_flops, 2 * fwd_flops),
    )


def _spread(batch: int) -> list[int]:
    """Rows per expert for ``batch`` images routed as CHOICES."""
    return [sum(1 for b in range(batch) if CHOICES[b % len(CHOICES)] == e) for e in range(NUM_EXPERTS)]


def bench_fused_pointwise(sizes: Sizes, device, dtype) -> list[Bench]:
    """The trunk's LayerNorm -> qkv (C -> 3C) and project_out (C -> C) + skip at each level, in
    the model's dtype (the LayerNorm's parameters float32, as the model keeps them)."""
    out = []
    for level, (width, side) in sizes.levels.items():
        x = _rand((sizes.batch, width, side, side), device, dtype)
        for case, c_out, norm in (("qkv_norm", 3 * width, True), ("project_out_residual", width, False)):
            w = (torch.randn(c_out, width, device=device) / width**0.5).to(dtype).requires_grad_(True)
            b = (0.1 * torch.randn(c_out, device=device)).to(dtype).requires_grad_(True)
            extra = {}
            if norm:
                extra["norm_weight"] = (1 + 0.1 * torch.randn(width, device=device)).requires_grad_(True)
                extra["norm_bias"] = (0.1 * torch.randn(width, device=device)).requires_grad_(True)
            else:
                extra["residual"] = _rand((sizes.batch, c_out, side, side), device, dtype)
            y_bytes = sizes.batch * c_out * side * side * x.element_size()
            params = nbytes(w, b, *(t for k, t in extra.items() if k != "residual"))
            residual = nbytes(extra["residual"]) if not norm else 0
            fl = 2.0 * x.numel() * c_out
            out.append(
                Bench(
                    op="fused_pointwise",
                    case=f"{level}.{case}",
                    shape=list(x.shape),
                    forward=lambda p, x=x, w=w, b=b, extra=extra: moce_kernels.fused_pointwise(
                        x, w, b, backend=p, **extra
                    ),
                    diff_outputs=lambda o: [o],
                    all_outputs=lambda o: [o],
                    inputs=[x, w, b, *extra.values()],
                    # forward: x (and the residual) in, y out; backward: grad y and x in, grad x
                    # out (the grad of the residual is grad y itself).
                    bytes_moved=_with_full(
                        nbytes(x) + residual + y_bytes + params, y_bytes + 2 * nbytes(x) + 2 * params
                    ),
                    flops=_full_flops(fl, 2 * fl),
                )
            )
    return out


def bench_grouped_dwconv(sizes: Sizes, device, dtype) -> list[Bench]:
    out = []
    rows = _spread(sizes.batch)
    for level, (width, side) in sizes.levels.items():
        ranks = [width // 8, width // 4, width // 2, width]
        ranks = [max(1, r) for r in ranks]
        if not sizes.quick:
            out.append(_dwconv_bench(f"{level}.experts_q3", rows, ranks, [3] * 4, side, device, dtype))
        out.append(
            _dwconv_bench(f"{level}.experts_kv7", rows, [2 * r for r in ranks], [7] * 4, side, device, dtype)
        )
    # The trunk's depthwise convs at the widest level, as one group: the GDFN's 3x3 on 4C
    # channels and the cross-attention's 7x7 on 2C.
    level = list(sizes.levels)[-1]
    width, side = sizes.levels[level]
    out.append(_dwconv_bench(f"{level}.trunk_ffn3", [sizes.batch], [4 * width], [3], side, device, dtype))
    if not sizes.quick:
        out.append(_dwconv_bench(f"{level}.trunk_kv7", [sizes.batch], [2 * width], [7], side, device, dtype))
    return out


def bench_grouped_layernorm2d(sizes: Sizes, device, dtype) -> list[Bench]:
    """The sync-free expert path's LayerNorm, every expert in one call (k = 1): each row's
    expert normalises its first r channels of the FFT output, r = C/8, C/4, C/2, C for
    C = ``sizes.expert_width``, at the widest level's side (8 rows of 96 channels at 128 x 128 for
    "full" and "quick"). x is float32 whatever the dtype (the FFT's output); ``dtype`` is the
    parameters' (packed [E, C], zeros past each expert's rank, as the model packs them)."""
    rows = _spread(sizes.batch)
    width, side = sizes.expert_width, sizes.levels[list(sizes.levels)[-1]][1]
    ranks = [max(1, width // 8), max(1, width // 4), max(1, width // 2), width]
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.zeros(len(ranks), width), torch.zeros(len(ranks), width)
    for e, r in enumerate(ranks):
        weight[e, :r] = 1 + 0.1 * torch.randn(r, generator=gen)
        bias[e, :r] = 0.1 * torch.randn(r, generator=gen)
    w = weight.to(device=device, dtype=dtype).requires_grad_(True)
    b = bias.to(device=device, dtype=dtype).requires_grad_(True)
    offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], device=device)
    x = _rand((sum(rows), width, side, side), device, torch.float32)
    # Each row reads its expert's channels and writes the whole row (zeros past its rank).
    # Backward reads grad_out and x on the active channels and writes the whole grad x, and the
    # parameters' gradients. The per-pixel statistics are not counted: a kernel could recompute
    # them (the Triton one saves them, 2 / r of the row's bytes).
    active = sum(n * r for n, r in zip(rows, ranks, strict=True)) * side * side
    params = nbytes(w, b)
    return [
        Bench(
            op="grouped_layernorm2d",
            case=f"experts_c{width}.{side}px",
            shape=list(x.shape),
            forward=lambda p: grouped_layernorm2d(x, w, b, offsets, ranks, backend=p),
            diff_outputs=lambda o: [o],
            all_outputs=lambda o: [o],
            inputs=[x, w, b],
            bytes_moved=_with_full(4 * active + params + nbytes(x), 2 * 4 * active + nbytes(x) + 2 * params),
            flops=_full_flops(8 * active, 12 * active),
        )
    ]


def _packed_weight(in_channels, out_channels, device, dtype, *, bias: bool):
    """[E, Cout_max, Cin_max] weight (zeros outside each expert's block) and bias, with grads."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.zeros(len(in_channels), max(out_channels), max(in_channels))
    packed_bias = torch.zeros(len(in_channels), max(out_channels))
    for e, (i, o) in enumerate(zip(in_channels, out_channels, strict=True)):
        weight[e, :o, :i] = torch.randn(o, i, generator=gen) / math.sqrt(i)
        packed_bias[e, :o] = torch.randn(o, generator=gen)
    w = weight.to(device=device, dtype=dtype).requires_grad_(True)
    b = packed_bias.to(device=device, dtype=dtype).requires_grad_(True) if bias else None
    return w, b


def _pointwise_bench(
    name: str,
    batch_rows: list[int],
    in_channels: list[int],
    out_channels: list[int],
    side: int,
    device,
    dtype,
    *,
    bias: bool,
) -> Bench:
    """One ``grouped_pointwise`` call: expert e maps its rows' first in_channels[e] channels to
    out_channels[e] (packed weight [E, Cout_max, Cin_max], zeros outside each expert's block)."""
    c_in, c_out, rows = max(in_channels), max(out_channels), sum(batch_rows)
    w, b = _packed_weight(in_channels, out_channels, device, dtype, bias=bias)
    offsets = torch.tensor([0, *torch.tensor(batch_rows).cumsum(0).tolist()], device=device)
    x = _rand((rows, c_in, side, side), device, dtype)
    plane, el = side * side, x.element_size()
    # Each row reads its expert's input channels and writes the whole output row (channels past
    # an expert's width are zeros by contract). Backward reads grad_out on the active output
    # channels and x on the active input channels, and writes every input gradient.
    active_in = sum(n * i for n, i in zip(batch_rows, in_channels, strict=True)) * plane * el
    active_out = sum(n * o for n, o in zip(batch_rows, out_channels, strict=True)) * plane * el
    full_out, params = rows * c_out * plane * el, nbytes(w, b)
    fwd_flops = sum(
        2 * n * i * o * plane for n, i, o in zip(batch_rows, in_channels, out_channels, strict=True)
    )
    return Bench(
        op="grouped_pointwise",
        case=name,
        shape=list(x.shape),
        forward=lambda p: grouped_pointwise(x, w, b, offsets, in_channels, out_channels, backend=p),
        diff_outputs=lambda o: [o],
        all_outputs=lambda o: [o],
        inputs=[x, w] + ([b] if bias else []),
        bytes_moved=_with_full(
            active_in + params + full_out, active_out + active_in + params + nbytes(x) + params
        ),
        flops=_full_flops(fwd_flops, 2 * fwd_flops),
    )


def bench_grouped_pointwise(sizes: Sizes, device, dtype) -> list[Bench]:
    """The experts' 1x1 convolutions at each level, every expert in one call (k = 1): the input
    projections C -> r and output projections r -> C, the kv projection r -> 2r, and the
    attention's output projection r -> r (with bias), for ranks r = C/8, C/4, C/2, C."""
    out = []
    rows = _spread(sizes.batch)
    for level, (width, side) in sizes.levels.items():
        ranks = [max(1, width // 8), max(1, width // 4), max(1, width // 2), width]
        cases = {
            "experts_in": ([width] * 4, ranks, False),
            "experts_out": (ranks, [width] * 4, False),
            "experts_kv": (ranks, [2 * r for r in ranks], False),
            "experts_proj": (ranks, ranks, True),
        }
        if sizes.quick:
            cases = {k: cases[k] for k in ("experts_in", "experts_proj")}
        for case, (c_in, c_out, bias) in cases.items():
            out.append(_pointwise_bench(f"{level}.{case}", rows, c_in, c_out, side, device, dtype, bias=bias))
    return out


def bench_dispatch_pointwise(sizes: Sizes, device, dtype) -> list[Bench]:
    """The experts' input projections C -> r (r = C/8 .. C) reading the images in place (k = 1);
    the reference dispatches a copy first."""
    plan = _plan(sizes.batch, device)
    rows = _spread(sizes.batch)
    out = []
    for level, (width, side) in sizes.levels.items():
        ranks = [max(1, width // 8), max(1, width // 4), max(1, width // 2), width]
        c_in = [width] * NUM_EXPERTS
        w, _ = _packed_weight(c_in, ranks, device, dtype, bias=False)
        x = _rand((sizes.batch, width, side, side), device, dtype)
        el, plane = x.element_size(), side * side
        written = sizes.batch * max(ranks) * plane * el
        active_out = sum(n * r for n, r in zip(rows, ranks, strict=True)) * plane * el
        fl = sum(2 * n * width * r * plane for n, r in zip(rows, ranks, strict=True))
        out.append(
            Bench(
                op="dispatch_pointwise",
                case=f"{level}.experts_in",
                shape=list(x.shape),
                forward=lambda p, x=x, w=w, ranks=ranks, c_in=c_in: moce_kernels.dispatch_pointwise(
                    x, w, None, plan, c_in, ranks, backend=p
                ),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[x, w],
                # forward: x and the weight in, the rows out; backward: grad rows and x in, grad x
                # (one row per image: k = 1) and the weight gradient out.
                bytes_moved=_with_full(nbytes(x, w) + written, active_out + 2 * nbytes(x) + 2 * nbytes(w)),
                flops=_full_flops(fl, 2 * fl),
            )
        )
    return out


def bench_pointwise_combine(sizes: Sizes, device, dtype) -> list[Bench]:
    """The experts' output projections r -> C with the residual, the gates and the write back to
    image order in one op (k = 1); the reference writes the rows, adds the dispatched residual
    and combines."""
    plan = _plan(sizes.batch, device)
    rows = _spread(sizes.batch)
    out = []
    for level, (width, side) in sizes.levels.items():
        ranks = [max(1, width // 8), max(1, width // 4), max(1, width // 2), width]
        c_out = [width] * NUM_EXPERTS
        w, _ = _packed_weight(ranks, c_out, device, dtype, bias=False)
        h = _rand((sizes.batch, max(ranks), side, side), device, dtype)
        res = _rand((sizes.batch, width, side, side), device, dtype)
        gates = plan.gates.detach().to(dtype).clone().requires_grad_(True)
        el, plane = h.element_size(), side * side
        active_in = sum(n * r for n, r in zip(rows, ranks, strict=True)) * plane * el
        fl = sum(2 * n * width * r * plane for n, r in zip(rows, ranks, strict=True))
        out.append(
            Bench(
                op="pointwise_combine",
                case=f"{level}.experts_out",
                shape=list(h.shape),
                forward=lambda p, h=h, w=w, res=res, gates=gates, ranks=ranks, c_out=c_out: (
                    moce_kernels.pointwise_combine(h, w, None, plan, ranks, c_out, res, gates, backend=p)
                ),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[h, w, res, gates],
                # forward: the rows' active channels, the residual and the weight in, the images
                # out; backward: grad out and the residual in, the rows recomputed (gates), grad h,
                # grad residual and the weight gradient out.
                bytes_moved=_with_full(
                    active_in + nbytes(w, res) + nbytes(res),
                    3 * nbytes(res) + 2 * active_in + nbytes(h) + 2 * nbytes(w),
                ),
                flops=_full_flops(fl, 3 * fl),
            )
        )
    return out


def bench_layernorm2d(sizes: Sizes, device, dtype) -> list[Bench]:
    out = []
    for level, (width, side) in sizes.levels.items():
        x = _rand((sizes.batch, width, side, side), device, dtype)
        w = (1 + 0.1 * torch.randn(width, device=device)).to(dtype).requires_grad_(True)
        b = (0.1 * torch.randn(width, device=device)).to(dtype).requires_grad_(True)
        params = nbytes(w, b)
        out.append(
            Bench(
                op="layernorm2d",
                case=level,
                shape=list(x.shape),
                forward=lambda p, x=x, w=w, b=b: moce_kernels.layernorm2d(x, w, b, backend=p),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[x, w, b],
                # forward: x in, out; backward: grad_out and x in (statistics recomputed), grad_x out.
                bytes_moved=_with_full(2 * nbytes(x) + params, 3 * nbytes(x) + 2 * params),
                flops=_full_flops(8 * x.numel(), 12 * x.numel()),
            )
        )
    return out


def _fft_flops(numel: int, patch: int) -> float:
    """rfft2 of q and k, irfft2 of the product: ~2.5 N log2 N real flops each per p*p patch."""
    n = patch * patch
    per_patch = 3 * 2.5 * n * math.log2(max(n, 2)) + 3 * n
    return numel / n * per_patch


def bench_patch_fft_conv(sizes: Sizes, device, dtype) -> list[Bench]:
    out = []
    level = list(sizes.levels)[-1]
    width, side = sizes.levels[level]
    ranks = [max(1, width // 8), max(1, width // 4), max(1, width // 2), width]
    cases = [(level, r, p) for r, p in zip(ranks, PATCH_SIZES, strict=True)]
    if sizes.quick:
        cases = [cases[1], cases[3]]
    elif len(sizes.levels) > 1:
        deep = list(sizes.levels)[0]
        cases.append((deep, sizes.levels[deep][0], PATCH_SIZES[-1]))
    for lvl, rank, patch in cases:
        lvl_side = sizes.levels[lvl][1]
        # All images on one expert: the largest call an expert sees at this level.
        q = _rand((sizes.batch, rank, lvl_side, lvl_side), device, dtype)
        k = _rand((sizes.batch, rank, lvl_side, lvl_side), device, dtype)
        out_bytes = q.numel() * 4  # float32 output
        fl = _fft_flops(q.numel(), patch)
        out.append(
            Bench(
                op="patch_fft_conv",
                case=f"{lvl}.r{rank}.p{patch}",
                shape=list(q.shape),
                forward=lambda p, q=q, k=k, patch=patch: moce_kernels.patch_fft_conv(q, k, patch, backend=p),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[q, k],
                # forward: q, k in, float32 out; backward: grad_out, q, k in, grad_q, grad_k out.
                bytes_moved=_with_full(nbytes(q, k) + out_bytes, out_bytes + 2 * nbytes(q, k)),
                flops=_full_flops(fl, 2 * fl),
            )
        )
    return out


def bench_qk_gram(sizes: Sizes, device, dtype) -> list[Bench]:
    """Channel attention's q k^T and norms at each level: heads of 32 channels as in MoCE-IR-S
    (one head where the level is narrower)."""
    out = []
    for level, (width, side) in sizes.levels.items():
        heads = max(1, width // 32)
        shape = (sizes.batch, heads, width // heads, side * side)
        q, k = _rand(shape, device, dtype), _rand(shape, device, dtype)
        fl = 2.0 * q.numel() * (shape[2] + 1)  # q k^T and the squares
        out.append(
            Bench(
                op="qk_gram",
                case=level,
                shape=list(shape),
                forward=lambda p, q=q, k=k: moce_kernels.qk_gram(q, k, backend=p),
                diff_outputs=list,
                all_outputs=list,
                inputs=[q, k],
                # forward: q, k in (the [D, D] maps out are small); backward: q, k in, their grads out.
                bytes_moved=_with_full(nbytes(q, k), 2 * nbytes(q, k)),
                flops=_full_flops(fl, 2 * fl),
            )
        )
    return out


def bench_channel_attention_map(sizes: Sizes, device, dtype) -> list[Bench]:
    """Channel attention's whole map (q k^T, the norms, the temperature, the softmax) at each
    level, heads as in ``bench_qk_gram``."""
    out = []
    for level, (width, side) in sizes.levels.items():
        heads = max(1, width // 32)
        shape = (sizes.batch, heads, width // heads, side * side)
        q, k = _rand(shape, device, dtype), _rand(shape, device, dtype)
        t = torch.ones(heads, 1, 1, device=device, dtype=torch.float32)
        fl = 2.0 * q.numel() * (shape[2] + 1)
        out.append(
            Bench(
                op="channel_attention_map",
                case=level,
                shape=list(shape),
                forward=lambda p, q=q, k=k, t=t: moce_kernels.channel_attention_map(q, k, t, backend=p),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[q, k],
                # As qk_gram: q and k read (the maps are small); backward: read again, grads written.
                bytes_moved=_with_full(nbytes(q, k), 2 * nbytes(q, k)),
                flops=_full_flops(fl, 2 * fl),
            )
        )
    return out


def bench_attention_projection_fold(sizes: Sizes, device, dtype) -> list[Bench]:
    """The attention's project_out folded with each image's map at each level (heads as in
    ``bench_qk_gram``): W [C, C] in the benchmark's dtype, the maps in float32."""
    out = []
    for level, (width, _) in sizes.levels.items():
        heads = max(1, width // 32)
        d = width // heads
        weight = _rand((width, width), device, dtype)
        attn = torch.rand(sizes.batch, heads, d, d, device=device).softmax(-1)
        folded_bytes = sizes.batch * width * width * weight.element_size()
        fl = 2.0 * sizes.batch * width * width * d
        out.append(
            Bench(
                op="attention_projection_fold",
                case=level,
                shape=[sizes.batch, width, heads, d],
                forward=lambda p, w=weight, a=attn: moce_kernels.attention_projection_fold(w, a, backend=p),
                diff_outputs=lambda o: [o],
                all_outputs=lambda o: [o],
                inputs=[weight],
                # forward: W and the maps in, W_b out; backward: grad W_b, W and the maps in, their
                # gradients out.
                bytes_moved=_with_full(
                    nbytes(weight, attn) + folded_bytes, folded_bytes + 2 * nbytes(weight, attn)
                ),
                flops=_full_flops(fl, 2 * fl),
            )
        )
    return out


def bench_grouped_patch_fft_conv(sizes: Sizes, device, dtype) -> list[Bench]:
    """The sync-free expert path's FFT product, every expert at its own patch size in one call
    (k = 1; ranks C/8 .. C with patch sizes 4 .. 32 for C = ``sizes.expert_width``, at the widest
    level's side), float32 result."""
    rows = _spread(sizes.batch)
    width, side = sizes.expert_width, sizes.levels[list(sizes.levels)[-1]][1]
    ranks = [max(1, width // 8), max(1, width // 4), max(1, width // 2), width]
    offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], device=device)
    q = _rand((sum(rows), width, side, side), device, dtype)
    k = _rand((sum(rows), width, side, side), device, dtype)
    # Each row reads its expert's channels of q and k and writes its whole float32 row (zeros
    # past its rank); backward reads the gradient and both inputs there and writes both grads.
    active = sum(n * r for n, r in zip(rows, ranks, strict=True)) * side * side
    in_bytes, out_bytes = active * q.element_size(), q.numel() * 4
    fl = sum(n * _fft_flops(r * side * side, p) for n, r, p in zip(rows, ranks, PATCH_SIZES, strict=True))
    return [
        Bench(
            op="grouped_patch_fft_conv",
            case=f"experts_c{width}.{side}px",
            shape=list(q.shape),
            forward=lambda p: moce_kernels.grouped_patch_fft_conv(
                q, k, offsets, ranks, PATCH_SIZES, backend=p
            ),
            diff_outputs=lambda o: [o],
            all_outputs=lambda o: [o],
            inputs=[q, k],
            bytes_moved=_with_full(
                2 * in_bytes + out_bytes, 4 * active + 2 * in_bytes + 2 * q.numel() * q.element_size()
            ),
            flops=_full_flops(fl, 2 * fl),
        )
    ]


SETUPS = {
    "route": bench_route,
    "dispatch": bench_dispatch,
    "combine": bench_combine,
    "dispatch_pointwise": bench_dispatch_pointwise,
    "pointwise_combine": bench_pointwise_combine,
    "dwconv_gate_pointwise": bench_dwconv_gate_pointwise,
    "dwconv_gelu_gate": bench_dwconv_gelu_gate,
    "fused_pointwise": bench_fused_pointwise,
    "grouped_dwconv": bench_grouped_dwconv,
    "grouped_layernorm2d": bench_grouped_layernorm2d,
    "grouped_patch_fft_conv": bench_grouped_patch_fft_conv,
    "grouped_pointwise": bench_grouped_pointwise,
    "layernorm2d": bench_layernorm2d,
    "patch_fft_conv": bench_patch_fft_conv,
    "qk_gram": bench_qk_gram,
    "channel_attention_map": bench_channel_attention_map,
    "attention_projection_fold": bench_attention_projection_fold,
}
assert tuple(SETUPS) == OPS, "every op of benchmarks.common.OPS has a setup, in that order"


def _mode_fn(bench: Bench, provider: str, mode: str) -> Callable[[], object]:
    if mode == "forward":

        def fwd():
            with torch.no_grad():
                return bench.forward(provider)

        return fwd
    if mode == "backward":
        outs = bench.diff_outputs(bench.forward(provider))
        grads = [torch.randn_like(o) for o in outs]
        return lambda: torch.autograd.grad(outs, bench.inputs, grads, retain_graph=True)

    def full():
        outs = bench.diff_outputs(bench.forward(provider))
        return torch.autograd.grad(outs, bench.inputs, [torch.ones_like(o) for o in outs])

    return full


def _gradients(bench: Bench, provider: str, seed: int = 1) -> list[torch.Tensor]:
    outs = bench.diff_outputs(bench.forward(provider))
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    return list(torch.autograd.grad(outs, bench.inputs, grads))


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def run_op(
    op: str,
    device: torch.device,
    dtypes: list[torch.dtype],
    size: str,
    ceil: dict,
    emit: Callable[[dict], None],
    deadline: Deadline,
    modes: tuple[str, ...] = MODES,
    min_time_s: float = 0.2,
) -> dict[str, str]:
    """Benchmark every case of ``op``; each row goes to ``emit``. Returns the unusable backends."""
    providers, unavailable = op_providers(op, device)
    for dtype in dtypes:
        dtype_name = str(dtype).removeprefix("torch.")
        torch.manual_seed(0)
        for bench in SETUPS[op](SIZES[size], device, dtype):
            reference_out = reference_grads = None
            for provider in providers:
                base = {
                    "suite": "ops",
                    "op": op,
                    "case": bench.case,
                    "shape": bench.shape,
                    "dtype": dtype_name,
                    "provider": provider,
                }
                if not deadline.allows(4 * min_time_s + 1):
                    for mode in modes:
                        emit(base | {"mode": mode, "status": "skipped", "error": "out of time budget"})
                    continue
                # Check before timing: the forward output, then the gradients (a provider without
                # a backward still gets its forward timed).
                failed: dict[str, str] = {}
                fwd_err = grad_err = None
                try:
                    with torch.no_grad():
                        got = [t.detach() for t in bench.all_outputs(bench.forward(provider))]
                    if provider == "reference":
                        reference_out = got
                    fwd_err = rel_error(got, reference_out)
                except Exception as e:  # noqa: BLE001  (a broken provider must not stop the run)
                    failed = dict.fromkeys(modes, _describe(e))
                if not failed:
                    try:
                        grads = _gradients(bench, provider)
                        if provider == "reference":
                            reference_grads = grads
                        grad_err = rel_error(grads, reference_grads)
                    except Exception as e:  # noqa: BLE001
                        failed = {m: _describe(e) for m in modes if m != "forward"}
                for mode in modes:
                    row = base | {"mode": mode}
                    if mode in failed:
                        emit(row | {"status": "error", "error": failed[mode]})
                        continue
                    if not deadline.allows(2 * min_time_s + 1):
                        emit(row | {"status": "skipped", "error": "out of time budget"})
                        continue
                    try:
                        t = measure(_mode_fn(bench, provider, mode), device, min_time_s=min_time_s)
                    except Exception as e:  # noqa: BLE001
                        emit(row | {"status": "error", "error": _describe(e)})
                        continue
                    moved = bench.bytes_moved[mode]
                    flops = bench.flops.get(mode, 0.0)
                    floor = roofline_ms(moved, flops, dtype_name, ceil)
                    emit(
                        row
                        | {
                            "status": "ok",
                            "median_ms": t.median_ms,
                            "p20_ms": t.p20_ms,
                            "p80_ms": t.p80_ms,
                            "samples": t.samples,
                            "bytes": moved,
                            "flops": flops,
                            "gb_per_s": moved / t.median_ms / 1e6,
                            "roofline_ms": floor,
                            "roofline_fraction": floor / t.median_ms if floor else None,
                            "rel_err": fwd_err if mode == "forward" else grad_err,
                        }
                    )
    return unavailable
