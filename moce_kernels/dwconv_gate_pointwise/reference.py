"""Pure-PyTorch definition of ``dwconv_gate_pointwise``: the tail of the GDFN (Restormer's gated
feed-forward network) after its ``project_in``, as the unfused layers compute it.

``project_out(gelu(a) * b) + residual`` with ``a, b = depthwise_conv(x).chunk(2, 1)``: fused, the
Ch-channel gate (``dwconv_gelu_gate``'s output) never goes to memory either: a kernel reads the
2 * Ch-channel ``project_in`` output and writes the block's C_out-channel result.
"""

from __future__ import annotations

import torch

from moce_kernels.dwconv_gelu_gate.reference import dwconv_gelu_gate_reference
from moce_kernels.fused_pointwise.reference import fused_pointwise_reference


def dwconv_gate_pointwise_reference(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`moce_kernels.dwconv_gate_pointwise` (arguments are assumed valid here).

    The roundings of the unfused layers, in order: the gate in x's dtype (``dwconv_gelu_gate``'s
    output tensor), the operand in weight's dtype, the product (float32 sums with the bias) in
    weight's dtype, then the residual added in the promoted dtype (``fused_pointwise``'s).
    """
    gate = dwconv_gelu_gate_reference(x, dw_weight, dw_bias)
    return fused_pointwise_reference(gate, weight, bias, residual=residual)
