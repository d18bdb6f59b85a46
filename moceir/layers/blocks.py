"""Encoder/decoder blocks and groups, resampling and the frequency embedding of MoCE-IR."""

from __future__ import annotations

import torch
from torch import nn

from moceir.layers.adapter import MoCELayer
from moceir.layers.attention import Attention, CrossAttention, FeedForward
from moceir.layers.conv import DepthwiseConv2d, PointwiseConv2d
from moceir.layers.norm import LayerNorm2d


class EncoderBlock(nn.Module):
    """``x + Attention(LN0(x))`` then ``x + FFN(LN1(x))`` (encoder, latent, refinement)."""

    def __init__(self, dim: int, heads: int, ffn_expansion: float, bias: bool) -> None:
        super().__init__()
        self.norms = nn.ModuleList([LayerNorm2d(dim), LayerNorm2d(dim)])
        self.mixer = Attention(dim, heads, bias)
        self.ffn = FeedForward(dim, ffn_expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The LayerNorms and skips go to the branches' 1x1 convolutions, which fuse them where the
        # backend allows (PointwiseConv2d.fused); unfused this is the docstring's x + branch(LN(x)),
        # bit for bit (only the order of the addition's operands differs).
        x = self.mixer(x, norm=self.norms[0], residual=x)
        return self.ffn(x, norm=self.norms[1], residual=x)


class DecoderBlock(nn.Module):
    """Shared attention branch + mixture-of-experts branch, mixed by cross-attention, then FFN."""

    def __init__(self, dim: int, heads: int, ffn_expansion: float, bias: bool, adapter: MoCELayer) -> None:
        super().__init__()
        self.norms = nn.ModuleList([LayerNorm2d(dim), LayerNorm2d(dim)])
        self.proj = nn.ModuleList([PointwiseConv2d(dim, dim), PointwiseConv2d(dim, dim)])
        self.shared = Attention(dim, heads, bias)
        self.mixer = CrossAttention(dim, heads, bias)
        self.ffn = FeedForward(dim, ffn_expansion, bias)
        self.adapter = adapter

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.proj[0].fuses_norm(x, self.norms[0]):
            # Each projection normalises x itself: x read twice, the normalised x never stored.
            xs = self.shared(self.proj[0].fused(x, self.norms[0]))
            xa = self.adapter(self.proj[1].fused(x, self.norms[0]), freq_emb, xs)
        else:
            x = self.norms[0](x)
            xs = self.shared(self.proj[0](x))
            xa = self.adapter(self.proj[1](x), freq_emb, xs)
        x = self.mixer(xa, xs, residual=shortcut)
        return self.ffn(x, norm=self.norms[1], residual=x)


class EncoderGroup(nn.Module):
    def __init__(self, dim: int, heads: int, num_blocks: int, ffn_expansion: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderBlock(dim, heads, ffn_expansion, bias=True) for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class DecoderGroup(nn.Module):
    def __init__(self, layers: list[DecoderBlock]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, freq_emb)
        return x


class Downsample(nn.Module):
    """3x3 conv C -> C/2 then pixel-unshuffle(2): 2C channels at half resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3x3 conv C -> 2C then pixel-shuffle(2): C/2 channels at double resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class HighPassConv2d(nn.Module):
    """Depthwise 3x3 conv initialised to the Laplacian. Trainable: the released weights trained it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = DepthwiseConv2d(dim, 3, bias=False)
        laplacian = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]])
        with torch.no_grad():
            self.conv.weight.copy_(laplacian.expand(dim, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FrequencyEmbedding(nn.Module):
    """Per-image vector from the latent features: GELU(high-pass(x)), spatial mean, MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.high_conv = nn.Sequential(HighPassConv2d(dim), nn.GELU())
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.high_conv(x).mean(dim=(-2, -1)))
