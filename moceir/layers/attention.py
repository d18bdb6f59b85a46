"""Transposed ("channel") attention of Restormer: self-attention (MDTA) and cross-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moceir.layers.conv import DepthwiseConv2d


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, temperature: torch.Tensor
):
    """softmax(normalize(q) @ normalize(k)^T * temperature) @ v over (C/heads x C/heads) maps.

    q, k, v: [B, C, H, W]; temperature: [heads, 1, 1]. Returns [B, C, H, W].
    """
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    # F.normalize (eps 1e-12) along H*W, as the official code does.
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature
    attn = attn.softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def depthwise(channels: int, kernel_size: int, bias: bool) -> DepthwiseConv2d:
    return DepthwiseConv2d(channels, kernel_size, bias)


class Attention(nn.Module):
    """MDTA: qkv 1x1 -> depthwise 3x3 -> channel attention per head -> project_out 1x1."""

    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = depthwise(dim * 3, 3, bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(channel_attention(q, k, v, self.heads, self.temperature))


class CrossAttention(nn.Module):
    """Queries from ``x`` (1x1 + depthwise 3x3), keys/values from ``y`` (1x1 + depthwise 7x7)."""

    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = nn.Conv2d(dim, dim, 1, bias=bias)
        self.q_dwconv = depthwise(dim, 3, bias)
        self.kv = nn.Conv2d(dim, dim * 2, 1, bias=bias)
        self.kv_dwconv = depthwise(dim * 2, 7, bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
        return self.project_out(channel_attention(q, k, v, self.heads, self.temperature))


class FeedForward(nn.Module):
    """GDFN: project_in 1x1 -> depthwise 3x3 -> gelu(x1) * x2 -> project_out 1x1."""

    def __init__(self, dim: int, expansion: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = depthwise(hidden * 2, 3, bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)
