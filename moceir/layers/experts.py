"""Complexity experts: low-rank "FFT attention" blocks of growing width and patch size.

All experts of an adapter run together (``run_experts``): rows sorted by expert, each expert on
its own rows only, the depthwise convolutions of every expert in one ``grouped_dwconv`` call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moce_kernels import grouped_dwconv, layernorm2d, pack_dwconv_weights, pack_rows, patch_fft_conv
from moce_kernels._backend import op_backend
from moceir.layers.attention import depthwise
from moceir.layers.norm import LayerNorm2d
from moceir.layers.packing_cache import cached_packing


class FFTAttention(nn.Module):
    """Expert body on r channels. Parameters only; the computation is in ``run_experts``.

    q = q_dwconv(q(x)); k, v = kv_dwconv(kv(x)); per p x p patch, the circular convolution of q
    and k (in float32); LayerNorm over channels; times v; proj_out.
    """

    def __init__(self, rank: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.q = nn.Conv2d(rank, rank, 1, bias=False)
        self.q_dwconv = depthwise(rank, 3, bias=True)
        self.kv = nn.Conv2d(rank, rank * 2, 1, bias=False)
        self.kv_dwconv = depthwise(rank * 2, 7, bias=True)
        self.norm = LayerNorm2d(rank)
        self.proj_out = nn.Conv2d(rank, rank, 1, bias=True)


class ComplexityExpert(nn.Module):
    """``expert(x, s) = proj[2](body(proj[0](x)) * silu(proj[1](s))) + x`` (rank r, patch p)."""

    def __init__(self, dim: int, rank: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(
            [
                nn.Conv2d(dim, rank, 1, bias=False),
                nn.Conv2d(dim, rank, 1, bias=False),
                nn.Conv2d(rank, dim, 1, bias=False),
            ]
        )
        self.body = FFTAttention(rank, patch_size)

    @property
    def rank(self) -> int:
        return self.proj[0].out_channels


def _packed_depthwise(convs: Sequence[nn.Conv2d], dtype: torch.dtype) -> tuple:
    """(weight, bias, channels, kernel sizes) of every expert's depthwise conv, packed, in ``dtype``
    (under autocast the activations may be bf16/fp16 while the parameters stay float32)."""
    weight, bias, channels, kernel_sizes = pack_dwconv_weights(
        [c.weight for c in convs], [c.bias for c in convs]
    )
    return weight.to(dtype), None if bias is None else bias.to(dtype), channels, kernel_sizes


def _grouped_depthwise(
    inputs: dict[int, torch.Tensor],
    convs: Sequence[nn.Conv2d],
    offsets: torch.Tensor,
    backend: str,
    cache: dict | None = None,
    name: str = "depthwise",
) -> dict[int, torch.Tensor]:
    """Run expert e's depthwise conv ``convs[e]`` on ``inputs[e]``, all experts in one call; the
    packed weights kept in ``cache`` under ``name`` between eval forwards."""
    packed = pack_rows(list(inputs.values()), max(c.in_channels for c in convs))  # [N, C_max, H, W]
    params = [p for c in convs for p in c.parameters()]
    weight, bias, channels, kernel_sizes = cached_packing(
        cache, name, params, packed.dtype, lambda: _packed_depthwise(convs, packed.dtype)
    )
    out = grouped_dwconv(
        packed, weight, bias, offsets, channels, kernel_sizes, backend=op_backend("grouped_dwconv", backend)
    )
    result, start = {}, 0
    for e, t in inputs.items():
        result[e] = out[start : start + t.shape[0], : channels[e]]
        start += t.shape[0]
    return result


def run_experts(
    experts: Sequence[ComplexityExpert],
    x: torch.Tensor,
    shared: torch.Tensor,
    offsets: torch.Tensor,
    depth: int = 1,
    backend: str = "auto",
    cache: dict | None = None,
) -> torch.Tensor:
    """Apply expert e to rows ``offsets[e]:offsets[e + 1]`` of ``x`` / ``shared`` ([N, C, H, W]).

    Experts with no rows do not run. ``depth`` > 1 chains the expert on its own output (the
    official code re-processed the input instead; the two agree at depth 1). Reads the offsets
    on the host once (the reference backend sizes each expert's batch with them). ``cache``: a
    dict owned by the caller for the packed depthwise weights (``moceir.layers.packing_cache``).
    """
    bounds = offsets.tolist()
    rows = {e: slice(bounds[e], bounds[e + 1]) for e in range(len(experts)) if bounds[e + 1] > bounds[e]}
    if not rows:  # no rows at all (an empty batch)
        return x.new_zeros(x.shape)
    feats = {e: x[r] for e, r in rows.items()}
    gating = {e: F.silu(experts[e].proj[1](shared[r])) for e, r in rows.items()}
    bodies = [ex.body for ex in experts]
    for _ in range(depth):
        h = {e: experts[e].proj[0](f) for e, f in feats.items()}
        q = _grouped_depthwise(
            {e: bodies[e].q(t) for e, t in h.items()}, [b.q_dwconv for b in bodies], offsets, backend,
            cache, "q_dwconv",
        )  # fmt: skip
        kv = _grouped_depthwise(
            {e: bodies[e].kv(t) for e, t in h.items()}, [b.kv_dwconv for b in bodies], offsets, backend,
            cache, "kv_dwconv",
        )  # fmt: skip
        new_feats = {}
        for e, f in feats.items():
            body = bodies[e]
            k, v = kv[e].chunk(2, dim=1)
            fft = patch_fft_conv(
                q[e], k, body.patch_size, backend=op_backend("patch_fft_conv", backend)
            )  # float32
            normed = layernorm2d(
                fft,
                body.norm.body.weight,
                body.norm.body.bias,
                body.norm.eps,
                backend=op_backend("layernorm2d", backend),
            )
            # normed is float32 (as in the official code); back to the features' dtype for proj_out.
            out = body.proj_out((normed * v).to(v.dtype))
            new_feats[e] = experts[e].proj[2](out * gating[e]) + f
        feats = new_feats
    return torch.cat(list(feats.values()), 0)
