"""The sync-free expert path: every expert of an adapter on the packed-by-rows layout.

``run_experts`` (experts.py) runs each expert on its own rows, which needs the row counts on the
host: one synchronisation per adapter on a GPU, and a graph break under torch.compile. This
path runs the same function over shapes that do not depend on the routing: the rows keep the
widest expert's channels (padding that the grouped ops keep at exact zeros) and each op finds a
row's expert from the device offsets. Its launch count is fixed, so a CUDA graph can capture it
and torch.compile traces it whole; the price is the padding (the reference GEMM and the FFTs
work on it; the Triton GEMM skips it). The first 1x1 convolutions read the images in place
(``dispatch_pointwise``) and the last writes the gated sum in image order (``pointwise_combine``):
the adapter's dispatch and combine copies do not exist on this path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moce_kernels import (
    RoutingPlan,
    combine,
    dispatch,
    dispatch_pointwise,
    grouped_dwconv,
    grouped_layernorm2d,
    grouped_patch_fft_conv,
    grouped_pointwise,
    pack_dwconv_weights,
    pack_pointwise_weights,
    pointwise_combine,
)
from moce_kernels._backend import op_backend
from moceir.layers.experts import ComplexityExpert
from moceir.layers.packing_cache import cached_packing


def _heads(tensors: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[torch.Tensor]:
    """The first ``rank`` channels of each expert's tensor (k of kv)."""
    return [t[:r] for t, r in zip(tensors, ranks, strict=True)]


def _tails(tensors: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[torch.Tensor]:
    """The channels after the first ``rank`` of each expert's tensor (v of kv)."""
    return [t[r:] for t, r in zip(tensors, ranks, strict=True)]


class _Grouped:
    """One adapter's expert parameters packed for the grouped ops, cast to the compute dtype."""

    def __init__(self, experts: Sequence[ComplexityExpert], dtype: torch.dtype) -> None:
        bodies = [ex.body for ex in experts]
        ranks = [ex.rank for ex in experts]

        def pointwise(weights, biases=None):
            w, b, _, _ = pack_pointwise_weights(weights, biases)
            return w.to(dtype), None if b is None else b.to(dtype)

        def depthwise(weights, biases):
            w, b, _, sizes = pack_dwconv_weights(weights, biases)
            return w.to(dtype), b.to(dtype), sizes

        self.ranks = ranks
        self.dim = experts[0].proj[0].in_channels
        self.patch_sizes = [b.patch_size for b in bodies]
        self.proj0 = pointwise([ex.proj[0].weight for ex in experts])
        self.proj1 = pointwise([ex.proj[1].weight for ex in experts])
        self.proj2 = pointwise([ex.proj[2].weight for ex in experts])
        self.q = pointwise([b.q.weight for b in bodies])
        # kv's output holds k then v (rank channels each): split, so that each is a channel prefix.
        self.k = pointwise(_heads([b.kv.weight for b in bodies], ranks))
        self.v = pointwise(_tails([b.kv.weight for b in bodies], ranks))
        self.proj_out = pointwise([b.proj_out.weight for b in bodies], [b.proj_out.bias for b in bodies])
        self.q_dw = depthwise([b.q_dwconv.weight for b in bodies], [b.q_dwconv.bias for b in bodies])
        kv_w, kv_b = [b.kv_dwconv.weight for b in bodies], [b.kv_dwconv.bias for b in bodies]
        self.k_dw = depthwise(_heads(kv_w, ranks), _heads(kv_b, ranks))
        self.v_dw = depthwise(_tails(kv_w, ranks), _tails(kv_b, ranks))
        r_max = max(ranks)
        self.norm = tuple(
            torch.stack([F.pad(t, (0, r_max - t.shape[0])) for t in params])
            for params in ([b.norm.body.weight for b in bodies], [b.norm.body.bias for b in bodies])
        )
        self.eps = bodies[0].norm.eps


def packed_experts(
    experts: Sequence[ComplexityExpert], dtype: torch.dtype, cache: dict | None = None
) -> _Grouped:
    """The experts' parameters packed for the grouped ops, in ``dtype``; kept in ``cache`` between
    eval forwards (``moceir.layers.packing_cache``): an eager forward then skips the ~15 small
    packing launches per adapter."""
    params = [p for ex in experts for p in ex.parameters()]
    return cached_packing(cache, "sync_free", params, dtype, lambda: _Grouped(experts, dtype))


def run_experts_grouped(
    experts: Sequence[ComplexityExpert],
    x: torch.Tensor,
    shared: torch.Tensor,
    plan: RoutingPlan,
    depth: int = 1,
    backend: str = "auto",
    cache: dict | None = None,
) -> torch.Tensor:
    """``combine(run_experts(experts, dispatch(x), dispatch(shared), plan.offsets, depth), plan)``
    with no host read: x / shared are the images [B, C, H, W]; returns [B, C, H, W], each image's
    expert outputs weighted by its gates and summed.

    The dispatch is fused into the first 1x1 convolutions (``dispatch_pointwise``) and the
    residual, gates, sum over k and write back into the last (``pointwise_combine``): no
    dispatched or combined copies. Sync-free when grouped_dwconv runs a fast backend (its
    reference reads the offsets). Under autocast the convolutions run in the autocast dtype, as
    nn.Conv2d does. ``cache``: a dict owned by the caller for the packed parameters (see
    :func:`packed_experts`).
    """
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    packed = packed_experts(experts, dtype, cache)
    with torch.autocast(x.device.type, enabled=False):
        return _run(packed, x, shared, plan, depth, backend, dtype)


def _run(
    p: _Grouped, x, shared, plan: RoutingPlan, depth: int, backend: str, dtype: torch.dtype
) -> torch.Tensor:
    ranks, full, offsets = p.ranks, [p.dim] * len(p.ranks), plan.offsets

    def pointwise(t, params, c_in, c_out):
        return grouped_pointwise(
            t, *params, offsets, c_in, c_out, backend=op_backend("grouped_pointwise", backend)
        )

    def from_images(t, params, c_out):
        return dispatch_pointwise(
            t.to(dtype), *params, plan, full, c_out, backend=op_backend("dispatch_pointwise", backend)
        )

    def depthwise(t, params):
        w, b, sizes = params
        return grouped_dwconv(t, w, b, offsets, ranks, sizes, backend=op_backend("grouped_dwconv", backend))

    gating = F.silu(from_images(shared, p.proj1, ranks))
    feats = None  # the rows after each step but the last (depth > 1 chains the expert)
    for step in range(depth):
        h = (
            from_images(x, p.proj0, ranks)
            if feats is None
            else pointwise(feats.to(dtype), p.proj0, full, ranks)
        )
        q = depthwise(pointwise(h, p.q, ranks, ranks), p.q_dw)
        k = depthwise(pointwise(h, p.k, ranks, ranks), p.k_dw)
        v = depthwise(pointwise(h, p.v, ranks, ranks), p.v_dw)
        fft = grouped_patch_fft_conv(
            q, k, offsets, ranks, p.patch_sizes, backend=op_backend("grouped_patch_fft_conv", backend)
        )  # float32
        # LN(fft) * v in one pass: the float32 LayerNorm output never goes to memory, and the
        # product is rounded once to v's dtype (as (normed * v).to(v.dtype) rounds it).
        normed_v = grouped_layernorm2d(
            fft, *p.norm, offsets, ranks, p.eps, gate=v, backend=op_backend("grouped_layernorm2d", backend)
        )
        out = pointwise(normed_v, p.proj_out, ranks, ranks) * gating
        if step == depth - 1:
            # The skip connection: the images themselves after one step, else the chained rows.
            combined = pointwise_combine(
                out, *p.proj2, plan, ranks, full, residual=x if feats is None else None,
                backend=op_backend("pointwise_combine", backend),
            )  # fmt: skip
            if feats is None:
                return combined
            return combined + combine(feats, plan, backend=op_backend("combine", backend))
        rows = pointwise(out, p.proj2, ranks, full)
        feats = rows + (
            dispatch(x, plan, backend=op_backend("dispatch", backend)) if feats is None else feats
        )
    raise AssertionError("depth must be >= 1")  # MoCELayer checks it
