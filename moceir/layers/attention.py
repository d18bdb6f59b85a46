"""Transposed ("channel") attention of Restormer: self-attention (MDTA) and cross-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moce_kernels._backend import op_backend, resolve_backend
from moce_kernels.channel_attention_map import channel_attention_map as fused_attention_map
from moce_kernels.dwconv_gate_pointwise import dwconv_gate_pointwise
from moce_kernels.dwconv_gelu_gate import dwconv_gelu_gate
from moceir.layers import tuning
from moceir.layers.composed_conv import pointwise_then_depthwise
from moceir.layers.conv import DepthwiseConv2d, PointwiseConv2d, apply_attention, tuning_key
from moceir.layers.norm import LayerNorm2d


def channel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    temperature: torch.Tensor,
    fold_norms: bool = False,
    backend: str = "reference",
):
    """softmax(normalize(q) @ normalize(k)^T * temperature) @ v over (C/heads x C/heads) maps.

    q, k, v: [B, C, H, W]; temperature: [heads, 1, 1]. Returns [B, C, H, W]. The map is
    :func:`channel_attention_map`'s (``fold_norms`` and ``backend`` are explained there).
    """
    return apply_attention(v, channel_attention_map(q, k, heads, temperature, fold_norms, backend))


def channel_attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    temperature: torch.Tensor,
    fold_norms: bool = False,
    backend: str = "reference",
) -> torch.Tensor:
    """softmax(normalize(q) @ normalize(k)^T * temperature): [B, heads, C/heads, C/heads].

    ``fold_norms``: the same function with the L2 normalisation moved onto the small map,
    ``(q @ k^T) / (|q| |k|^T)``, instead of normalising q and k (two passes writing [B, C, H*W]
    tensors, and their backward): 1.4x forward + backward at MoCE-IR-S's 128 x 128 level on
    the CPU, equal to float64 rounding. Only where the unnormalised product cannot overflow:
    float16 keeps the official form (see :func:`can_fold_norms`). With ``backend`` (the model's)
    giving ``moce_kernels.channel_attention_map`` a kernel (Triton: "auto" on a GPU, "triton"),
    the whole map comes from that op: the product and both norms from one pass over q and k,
    summed in float32, then one kernel for the norms, the temperature and the softmax (two
    launches forward, where these torch ops take about a dozen); the map comes in float32 (the
    caller casts it to v's dtype for ``attn @ v``, as the matmul form computes it).
    """
    b, c, h, w = q.shape
    q, k = (t.reshape(b, heads, c // heads, h * w) for t in (q, k))
    map_backend = _map_backend(backend, q, k) if fold_norms else "reference"
    if map_backend != "reference":
        return fused_attention_map(q, k, temperature, backend=map_backend)
    if fold_norms:
        # max(|x|, eps) as F.normalize divides by (eps 1e-12).
        q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12)
        k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
        attn = (q @ k.transpose(-2, -1)) / (q_norm * k_norm.transpose(-2, -1)) * temperature
    else:
        # F.normalize (eps 1e-12) along H*W, as the official code does.
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * temperature
    return attn.softmax(dim=-1)


def _map_backend(backend: str, q: torch.Tensor, k: torch.Tensor) -> str:
    """The concrete backend of ``channel_attention_map`` for a model on ``backend``; "reference"
    keeps the torch ops below (the op's reference computes in float32 copies: no faster)."""
    if q.dtype != k.dtype:
        return "reference"
    return resolve_backend("channel_attention_map", op_backend("channel_attention_map", backend), q.device)


def can_fold_norms(backend: str, x: torch.Tensor) -> bool:
    """Whether an attention module with ``backend`` folds the normalisation for input ``x``:
    not on the reference backend (the official code, op for op), and not where the product
    runs in float16 (a sum of H*W unnormalised products can pass its 65504)."""
    if backend == "reference":
        return False
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return dtype in (torch.float32, torch.float64, torch.bfloat16)


def depthwise(channels: int, kernel_size: int, bias: bool) -> DepthwiseConv2d:
    return DepthwiseConv2d(channels, kernel_size, bias)


class Attention(nn.Module):
    """MDTA: qkv 1x1 -> depthwise 3x3 -> channel attention per head -> project_out 1x1.

    With a fast backend (``self.qkv_dwconv.backend``, set by ``model.set_backend``) the
    attention folds its normalisation (:func:`channel_attention`'s ``fold_norms``). In benchmark
    mode qkv -> qkv_dwconv may run as one dense 3x3 convolution
    (:func:`~moceir.layers.composed_conv.pointwise_then_depthwise`)."""

    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = PointwiseConv2d(dim, dim * 3, bias=bias)
        self.qkv_dwconv = depthwise(dim * 3, 3, bias)
        self.project_out = PointwiseConv2d(dim, dim, bias=bias)

    def forward(
        self, x: torch.Tensor, norm: LayerNorm2d | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``project_out(attention(qkv(norm(x)))) + residual`` (norm and residual optional: the
        block's LayerNorm and skip, fused into the 1x1 convolutions where the backend allows;
        see :meth:`PointwiseConv2d.fused`)."""
        q, k, v = pointwise_then_depthwise(x, self.qkv, self.qkv_dwconv, norm).chunk(3, dim=1)
        backend = self.qkv_dwconv.backend
        fold = can_fold_norms(backend, q)
        attn = channel_attention_map(q, k, self.heads, self.temperature, fold, backend)
        return self.project_out.attend(v, attn, residual)


class CrossAttention(nn.Module):
    """Queries from ``x`` (1x1 + depthwise 3x3, in benchmark mode possibly one dense 3x3
    convolution, as in :class:`Attention`), keys/values from ``y`` (1x1 + depthwise 7x7)."""

    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = PointwiseConv2d(dim, dim, bias=bias)
        self.q_dwconv = depthwise(dim, 3, bias)
        self.kv = PointwiseConv2d(dim, dim * 2, bias=bias)
        self.kv_dwconv = depthwise(dim * 2, 7, bias)
        self.project_out = PointwiseConv2d(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``project_out(attention) + residual`` (the skip fused into project_out where the
        backend allows)."""
        q = pointwise_then_depthwise(x, self.q, self.q_dwconv)
        k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
        backend = self.q_dwconv.backend
        fold = can_fold_norms(backend, q)
        attn = channel_attention_map(q, k, self.heads, self.temperature, fold, backend)
        return self.project_out.attend(v, attn, residual)


class FeedForward(nn.Module):
    """GDFN: project_in 1x1 -> depthwise 3x3 -> gelu(x1) * x2 -> project_out 1x1.

    With a fast backend (``self.dwconv.backend``, set by ``model.set_backend``) the depthwise
    convolution and the gate run as one ``dwconv_gelu_gate``: its 2 * hidden-channel output
    never goes to memory. Where ``dwconv_gate_pointwise`` has a kernel (Triton) the whole tail,
    depthwise convolution -> gate -> project_out (+ the block's skip), may run as that one op,
    so that the hidden-channel gate never goes to memory either: always with
    ``backend="triton"``, in benchmark mode with "auto" on a GPU when it timed faster than the
    two ops for the shape (the default there: the two ops; unmeasured on a GPU so far). The
    parameters and state-dict keys stay those of the three convolutions.
    """

    def __init__(self, dim: int, expansion: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = PointwiseConv2d(dim, hidden * 2, bias=bias)
        self.dwconv = depthwise(hidden * 2, 3, bias)
        self.project_out = PointwiseConv2d(hidden, dim, bias=bias)

    def forward(
        self, x: torch.Tensor, norm: LayerNorm2d | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``project_out(gate(project_in(norm(x)))) + residual`` (norm and residual optional, as
        in :meth:`Attention.forward`)."""
        h = self.project_in.fused(x, norm)
        backend = self._gate_backend(h)
        if backend == "reference":
            # The unfused module code, unchanged: backend "reference", and the backends the fused
            # op has no kernel of (self.dwconv still runs theirs).
            x1, x2 = self.dwconv(h).chunk(2, dim=1)
            return self.project_out.fused(F.gelu(x1) * x2, residual=residual)
        tail = self._tail_backend(h, residual, backend)
        if tail is not None:
            return self._fused_tail(h, residual, tail)
        return self._gate_then_project(h, residual, backend)

    def _gate_backend(self, h: torch.Tensor) -> str:
        """The concrete backend of ``dwconv_gelu_gate`` for ``h``; "reference" means unfused."""
        autocast = torch.is_autocast_enabled(h.device.type)
        if h.dim() != 4 or (not autocast and h.dtype != self.dwconv.weight.dtype):
            # Inputs the op does not take keep nn.Conv2d's own behaviour and errors.
            return "reference"
        backend = op_backend("dwconv_gelu_gate", self.dwconv.backend)
        if backend == "auto":
            # Resolved here: where "auto" finds no kernel of the fused op (the CPU until its C++
            # kernel lands) the unfused code runs, with self.dwconv's own "auto" choice, rather
            # than the op's reference.
            backend = resolve_backend("dwconv_gelu_gate", "auto", h.device)
        return backend

    def _tail_backend(self, h: torch.Tensor, residual: torch.Tensor | None, gate_backend: str) -> str | None:
        """The concrete backend of ``dwconv_gate_pointwise`` for this call, or None for the two
        ops (``gate_backend``: the gate's, for benchmark mode's other candidate)."""
        project_out = self.project_out
        backend = op_backend("dwconv_gate_pointwise", self.dwconv.backend)
        if not project_out.fuse_neighbours or backend == "reference":
            return None
        out_shape = (h.shape[0], project_out.out_channels, *h.shape[2:])
        if residual is not None and (residual.shape != out_shape or not residual.is_floating_point()):
            return None  # a residual that broadcasts, or is not float: the unfused add's behaviour
        if backend != "auto":
            return backend
        backend = resolve_backend("dwconv_gate_pointwise", "auto", h.device)
        if backend == "reference" or not (h.is_cuda and tuning.in_use(h)):
            return None
        candidates = {
            "separate": lambda: self._gate_then_project(h, residual, gate_backend),
            "fused": lambda: self._fused_tail(h, residual, backend),
        }
        kind = "dwconv-gate-pointwise" + ("-residual" if residual is not None else "")
        chosen = tuning.choose(tuning_key(kind, h, project_out), candidates, "separate", h)
        return backend if chosen == "fused" else None

    def _gate_then_project(
        self, h: torch.Tensor, residual: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        """The two ops: ``dwconv_gelu_gate`` on ``backend``, then ``project_out`` (+ residual)."""
        return self.project_out.fused(self._fused_gate(h, backend), residual=residual)

    def _fused_gate(self, h: torch.Tensor, backend: str) -> torch.Tensor:
        conv = self.dwconv
        h, weight, bias = conv.autocast_operands(h)
        c, k = conv.in_channels, conv.kernel_size[0]
        with torch.autocast(h.device.type, enabled=False):
            return dwconv_gelu_gate(h, weight.reshape(c, k, k), bias, backend=backend)

    def _fused_tail(self, h: torch.Tensor, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
        conv, project_out = self.dwconv, self.project_out
        h, dw_weight, dw_bias = conv.autocast_operands(h)
        # The 1x1 convolution's operands as autocast gives them (the gate is rounded to them).
        weight, bias = project_out.product_operands(h)
        c, k = conv.in_channels, conv.kernel_size[0]
        with torch.autocast(h.device.type, enabled=False):
            return dwconv_gate_pointwise(
                h,
                dw_weight.reshape(c, k, k),
                dw_bias,
                weight.view(project_out.out_channels, project_out.in_channels),
                bias,
                residual=residual,
                backend=backend,
            )
