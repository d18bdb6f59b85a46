"""Pure-PyTorch definition of ``grouped_pointwise``: the 1x1 convolutions of several experts of
different widths at once, in the packed-by-rows layout (see ``moce_kernels._grouping``).

It is written without host reads: every row takes its expert's weight (``per_row``) and one
batched GEMM (MKL / cuBLAS) does the work, over shapes that do not depend on the routing.
The price is the padding: every row pays for the widest expert's channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moce_kernels._grouping import channel_mask, per_row, row_experts


def grouped_pointwise_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
) -> torch.Tensor:
    """See :func:`moce_kernels.grouped_pointwise` (arguments are assumed valid here)."""
    rows, c_in, height, width = x.shape
    num_experts, c_out, _ = weight.shape
    in_mask = channel_mask(in_channels, c_in, x.device)  # [E, C_in]
    out_mask = channel_mask(out_channels, c_out, x.device)  # [E, C_out]
    # Entries outside an expert's (out, in) block are ignored: zero them, and zero the input
    # channels the row's expert does not read (so that NaN there cannot leak in).
    w = weight.masked_fill(~(out_mask[:, :, None] & in_mask[:, None, :]), 0)
    experts_of_rows = row_experts(offsets, rows)
    w_rows = per_row(w, experts_of_rows)  # [N, C_out, C_in]
    x = x.masked_fill(~in_mask[experts_of_rows][:, :, None, None], 0)
    y = torch.bmm(w_rows, x.reshape(rows, c_in, height * width)).view(rows, c_out, height, width)
    if bias is not None:
        b_rows = per_row(bias.masked_fill(~out_mask, 0), experts_of_rows)  # [N, C_out]
        y = y + b_rows[:, :, None, None]
    return y


def pack_pointwise_weights(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[int]]:
    """Pack per-expert 1x1 convolution weights [Cout_e, Cin_e(, 1, 1)] (and biases [Cout_e]).

    Differentiable: gradients of the packed tensors flow back to each expert's own parameters.

    Returns:
        (weight [E, Cout_max, Cin_max], bias [E, Cout_max] or None, in_channels, out_channels).
    """
    if len(weights) == 0:
        raise ValueError("weights must hold at least one expert's weight")
    flat = [w.reshape(w.shape[0], w.shape[1]) for w in weights]
    out_channels = [int(w.shape[0]) for w in flat]
    in_channels = [int(w.shape[1]) for w in flat]
    c_out, c_in = max(out_channels), max(in_channels)
    packed = torch.stack([F.pad(w, (0, c_in - w.shape[1], 0, c_out - w.shape[0])) for w in flat])
    packed_bias = None
    if biases is not None and any(b is not None for b in biases):
        if any(b is None for b in biases):
            raise ValueError("biases must be given for every expert or for none")
        packed_bias = torch.stack([F.pad(b, (0, c_out - b.shape[0])) for b in biases])
    return packed, packed_bias, in_channels, out_channels
