"""Pure-PyTorch definition of ``grouped_dwconv``: depthwise convolutions of several experts at once.

Layout ("packed by rows"): N rows sorted by expert, expert e owning rows
``offsets[e]:offsets[e + 1]`` and the first ``channels[e]`` of C_max channels. Weights are packed
the same way: ``weight[e, :channels[e]]`` holds expert e's K_e x K_e kernels, centred in the
K_max x K_max window (a centred kernel zero-padded to K_max gives the same "same" convolution,
so one layout serves every kernel size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def centre_slice(k_max: int, k: int) -> slice:
    lo = (k_max - k) // 2
    return slice(lo, lo + k)


def grouped_dwconv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: Sequence[int],
    channels: Sequence[int],
    kernel_sizes: Sequence[int],
) -> torch.Tensor:
    """See :func:`moce_kernels.grouped_dwconv`; ``offsets`` is a host list here."""
    c_max = x.shape[1]
    k_max = weight.shape[-1]
    pieces = []
    for e, (c, k) in enumerate(zip(channels, kernel_sizes, strict=True)):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue  # an expert no image chose does not run
        window = centre_slice(k_max, k)
        w = weight[e, :c, window, window].unsqueeze(1)  # [c, 1, k, k]
        b = None if bias is None else bias[e, :c]
        y = F.conv2d(x[lo:hi, :c], w, b, padding=k // 2, groups=c)
        pieces.append(F.pad(y, (0, 0, 0, 0, 0, c_max - c)))  # channels past c are zero
    if not pieces:
        # N = 0: an empty result that still belongs to the autograd graph of x and weight.
        out = x * 0 + weight.sum() * 0
        return out if bias is None else out + bias.sum() * 0
    return torch.cat(pieces, 0)


def pack_dwconv_weights(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[int]]:
    """Pack per-expert depthwise weights [C_e, 1, K_e, K_e] (and biases [C_e]) for grouped_dwconv.

    Differentiable: gradients of the packed tensors flow back to each expert's own parameters.

    Returns:
        (weight [E, C_max, K_max, K_max], bias [E, C_max] or None, channels, kernel_sizes).
    """
    if len(weights) == 0:
        raise ValueError("weights must hold at least one expert's kernel")
    channels = [int(w.shape[0]) for w in weights]
    kernel_sizes = [int(w.shape[-1]) for w in weights]
    c_max, k_max = max(channels), max(kernel_sizes)
    packed = []
    for w, c, k in zip(weights, channels, kernel_sizes, strict=True):
        p = (k_max - k) // 2
        packed.append(F.pad(w.squeeze(1), (p, p, p, p, 0, c_max - c)))
    packed_bias = None
    if biases is not None and any(b is not None for b in biases):
        if any(b is None for b in biases):
            raise ValueError("biases must be given for every expert or for none")
        packed_bias = torch.stack([F.pad(b, (0, c_max - b.shape[0])) for b in biases])
    return torch.stack(packed), packed_bias, channels, kernel_sizes


def pack_rows(tensors: Sequence[torch.Tensor], c_max: int) -> torch.Tensor:
    """Concatenate per-expert [n_e, C_e, H, W] tensors into the packed [N, C_max, H, W] layout."""
    return torch.cat([F.pad(t, (0, 0, 0, 0, 0, c_max - t.shape[1])) for t in tensors], 0)
