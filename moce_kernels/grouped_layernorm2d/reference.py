"""Pure-PyTorch definition of ``grouped_layernorm2d``: each row normalised over its own expert's
channels, in the packed-by-rows layout (see ``moce_kernels._grouping``).

Masked statistics over C_max channels: no host read and shapes that do not depend on the
routing. Every row's statistics count only its expert's channels, so the result equals the
expert's own LayerNorm on those channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels._grouping import channel_mask, per_row, row_experts


def grouped_layernorm2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    offsets: torch.Tensor,
    channels: Sequence[int],
    eps: float = 1e-5,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`moce_kernels.grouped_layernorm2d` (arguments are assumed valid here)."""
    rows, c_max = x.shape[:2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mask = channel_mask(channels, c_max, x.device)  # [E, C_max]
    experts_of_rows = row_experts(offsets, rows)
    row_mask = mask[experts_of_rows][:, :, None, None]  # [N, C_max, 1, 1]
    count = row_mask.sum(1, keepdim=True).to(acc)  # the row expert's channel count
    xf = x.to(acc).masked_fill(~row_mask, 0)
    mean = xf.sum(1, keepdim=True) / count
    centred = (xf - mean).masked_fill(~row_mask, 0)
    var = (centred * centred).sum(1, keepdim=True) / count  # population variance, as the official
    w_rows = per_row(weight.to(acc).masked_fill(~mask, 0), experts_of_rows)[:, :, None, None]
    b_rows = per_row(bias.to(acc).masked_fill(~mask, 0), experts_of_rows)[:, :, None, None]
    y = centred / torch.sqrt(var + eps) * w_rows + b_rows
    if gate is not None:
        # In the accumulation type, rounded once to the gate's dtype.
        y = y * gate.to(acc)
    # Exact zeros past the expert's channels, even when NaN in its own channels makes var NaN.
    return y.masked_fill(~row_mask, 0).to(x.dtype if gate is None else gate.dtype)
