"""A 1x1 convolution followed by a depthwise k x k one, as one dense k x k convolution.

``depthwise(pointwise(x))`` is linear in x: output channel o at pixel p is
``sum_t w_dw[o, t] * sum_i W_pw[o, i] * x[i, p + t]``, a dense convolution with the weight
``W[o, i, t] = W_pw[o, i] * w_dw[o, t]`` (Attention's qkv -> qkv_dwconv, CrossAttention's q ->
q_dwconv). It trades bytes for arithmetic: the 1x1 convolution's output (3 C channels for qkv) is
never written and read back, and cuDNN's dense convolution replaces our depthwise kernel, for k^2
times the 1x1 convolution's multiply-adds. Where that pays (the wide, shallow levels, if at all)
is a GPU question, so the trunk offers it as one more candidate of benchmark mode
(:func:`pointwise_then_depthwise`), never as a default.

The 1x1 convolution's bias b goes through the depthwise one as ``b_o * sum_t w_dw[o, t]`` at
pixels whose every tap is inside the image; at the border the depthwise convolution's zero
padding drops the taps that fall outside, so the dense convolution's output is corrected there
(:func:`correct_border`: the border rows and columns only, from a depthwise convolution of the
bias over a k x k image).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moceir.layers import tuning
from moceir.layers.conv import DepthwiseConv2d, PointwiseConv2d, tuning_key
from moceir.layers.packing_cache import cached_packing

if TYPE_CHECKING:
    from moceir.layers.norm import LayerNorm2d


def composed_weights(
    pointwise: PointwiseConv2d, depthwise: DepthwiseConv2d
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [C_out, C_in, k, k], bias [C_out] or None) of the dense convolution that equals
    ``depthwise(pointwise(x))`` away from the border (differentiable in both layers' parameters)."""
    weight = pointwise.weight * depthwise.weight  # [C_out, C_in, 1, 1] * [C_out, 1, k, k]
    bias = depthwise.bias
    if pointwise.bias is not None:
        through = pointwise.bias * depthwise.weight.sum(dim=(1, 2, 3))
        bias = through if bias is None else through + bias
    return weight, bias


def _border_map(bias: torch.Tensor, weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """What the 1x1 convolution's ``bias`` [C] loses through the depthwise ``weight`` [C, 1, k, k]
    at the border of an h x w image, on the image with its interior rows and columns collapsed to
    one each ([C, min(h, k), min(w, k)]: whether a tap falls outside depends only on the distance
    to the nearest edge, so every interior row and column is alike)."""
    c, k = weight.shape[0], weight.shape[-1]
    ones = bias.view(1, c, 1, 1).expand(1, c, min(h, k), min(w, k))
    through = F.conv2d(ones, weight, padding=k // 2, groups=c)[0]  # zero padding, as the layer
    return through - (bias * weight.sum(dim=(1, 2, 3))).view(c, 1, 1)


def _widen(part: torch.Tensor, size: int, pad: int) -> torch.Tensor:
    """Undo :func:`_border_map`'s collapse along the last dimension."""
    if size <= 2 * pad:
        return part
    middle = part[..., pad : pad + 1].expand(*part.shape[:-1], size - 2 * pad)
    return torch.cat([part[..., :pad], middle, part[..., pad + 1 :]], dim=-1)


def correct_border(y: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Add, in place at the border of ``y`` [B, C, H, W] (the dense convolution's output, whose
    bias assumed every tap inside), what the 1x1 convolution's ``bias`` [C] really contributes
    through the depthwise ``weight`` [C, 1, k, k] there: the depthwise convolution reads zeros,
    not the bias, where its taps fall outside the image. Four strips, a few launches."""
    k, (h, w) = weight.shape[-1], y.shape[-2:]
    pad = k // 2
    if pad == 0:
        return y
    with torch.autocast(y.device.type, enabled=False):
        fix = _border_map(bias.to(y.dtype), weight.to(y.dtype), h, w)
        if h <= 2 * pad:  # every row is a border row
            y += _widen(fix, w, pad)
            return y
        y[:, :, :pad] += _widen(fix[:, :pad], w, pad)
        y[:, :, h - pad :] += _widen(fix[:, pad + 1 :], w, pad)
        inner = fix[:, pad : pad + 1]  # the interior rows: only their border columns lose taps
        if w <= 2 * pad:
            y[:, :, pad : h - pad] += inner
        else:
            y[:, :, pad : h - pad, :pad] += inner[..., :pad]
            y[:, :, pad : h - pad, w - pad :] += inner[..., pad + 1 :]
    return y


def composed_conv(x: torch.Tensor, pointwise: PointwiseConv2d, depthwise: DepthwiseConv2d) -> torch.Tensor:
    """``depthwise(pointwise(x))`` as one dense convolution (cuDNN's on a GPU) with
    :func:`composed_weights`, the border corrected for the 1x1 convolution's bias. The same
    function; the rounding differs (the product of the weights is rounded, not the 1x1
    convolution's output). Under autocast the convolution runs in the autocast dtype."""
    if depthwise.in_channels != pointwise.out_channels or depthwise.groups != depthwise.in_channels:
        raise ValueError(
            f"depthwise must be a depthwise convolution over pointwise's {pointwise.out_channels} output "
            f"channels, got {depthwise.in_channels} channels in {depthwise.groups} groups"
        )
    weight, bias = _kept_composed_weights(x, pointwise, depthwise)
    y = F.conv2d(x, weight, bias, padding=depthwise.padding)
    if pointwise.bias is not None:
        y = correct_border(y, pointwise.bias, depthwise.weight)
    return y


def _kept_composed_weights(
    x: torch.Tensor, pointwise: PointwiseConv2d, depthwise: DepthwiseConv2d
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`composed_weights`, under autocast cast to its dtype (as F.conv2d would cast them),
    kept between eval forwards in the 1x1 convolution's cache (``moceir.layers.packing_cache``):
    an eval forward then makes no weight product and no cast."""
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else pointwise.weight.dtype
    params = [p for m in (pointwise, depthwise) for p in (m.weight, m.bias) if p is not None]

    def build() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = composed_weights(pointwise, depthwise)
        if autocast:
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        return weight, bias

    return cached_packing(pointwise.eval_cache(), "composed", params, dtype, build)


def pointwise_then_depthwise(
    x: torch.Tensor, pointwise: PointwiseConv2d, depthwise: DepthwiseConv2d, norm: LayerNorm2d | None = None
) -> torch.Tensor:
    """``depthwise(pointwise(norm(x)))``: the two layers as they are (the LayerNorm fused into
    the 1x1 convolution where the backend allows: :meth:`PointwiseConv2d.fused`), or, in
    benchmark mode on a GPU with ``backend="auto"``, :func:`composed_conv` where its first call
    of the shape timed faster (inside :func:`always_composed`: wherever the shapes allow)."""

    def composed() -> torch.Tensor:
        return composed_conv(x if norm is None else norm(x), pointwise, depthwise)

    if _ALWAYS.get() and _pair_fits(x, pointwise, depthwise):
        return composed()
    if _may_compose(x, pointwise, depthwise):
        kind = "pointwise-depthwise" + ("-norm" if norm is not None else "")
        candidates = {"separate": lambda: depthwise(pointwise.fused(x, norm)), "composed": composed}
        if tuning.choose(tuning_key(kind, x, depthwise), candidates, "separate", x) == "composed":
            return composed()
    return depthwise(pointwise.fused(x, norm))


#: :func:`pointwise_then_depthwise` offers the composed convolution only for calls with at least
#: this many pixels (all images) per input channel: its weight has k^2 C_out C_in elements, made
#: at every forward, against the 2 C_out values per pixel it saves; at the deeper levels of a
#: small batch the weight is the larger (the benchmarks' byte counter, MoCE-IR-S at batch 4,
#: 64 x 64: the composition moved more bytes than it saved there).
COMPOSE_MIN_PIXELS_PER_CHANNEL = 16

#: Set inside :func:`always_composed`; a context variable, so that it holds for the thread (or
#: asyncio task) that opened the context only.
_ALWAYS = contextvars.ContextVar("moceir_always_composed", default=False)


@contextlib.contextmanager
def always_composed() -> Iterator[None]:
    """Within it every pair runs composed wherever the shapes allow, on any device and backend,
    benchmark mode or not: for the byte counter (``python -m benchmarks.traffic
    --composed-pairs``) and tests. Affects the calling thread only."""
    token = _ALWAYS.set(True)
    try:
        yield
    finally:
        _ALWAYS.reset(token)


def _pair_fits(x: torch.Tensor, pointwise: PointwiseConv2d, depthwise: DepthwiseConv2d) -> bool:
    return (
        x.dim() == 4
        and x.is_floating_point()
        and x.shape[1] == pointwise.in_channels
        and depthwise.in_channels == pointwise.out_channels
    )


def _may_compose(x: torch.Tensor, pointwise: PointwiseConv2d, depthwise: DepthwiseConv2d) -> bool:
    """Whether benchmark mode may time the composed convolution for this call."""
    return (
        pointwise.backend == "auto"
        and depthwise.backend == "auto"
        and pointwise.fuse_neighbours
        and x.is_cuda
        and tuning.in_use(x)
        and _pair_fits(x, pointwise, depthwise)
        and _enough_pixels(x)
    )


def _enough_pixels(x: torch.Tensor) -> bool:
    """At least COMPOSE_MIN_PIXELS_PER_CHANNEL pixels (all images) per input channel."""
    return x.shape[0] * x.shape[2] * x.shape[3] >= COMPOSE_MIN_PIXELS_PER_CHANNEL * x.shape[1]
