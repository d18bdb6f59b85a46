"""``grouped_pointwise``: 1x1 convolutions of experts of different widths, all rows at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor
from moce_kernels._grouping import check_channels, check_offsets_on_host
from moce_kernels.grouped_pointwise.reference import grouped_pointwise_reference, pack_pointwise_weights

__all__ = [
    "check_pointwise_args",
    "grouped_pointwise",
    "grouped_pointwise_reference",
    "pack_pointwise_weights",
]


def check_pointwise_args(
    x_name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
) -> None:
    """Raise TypeError / ValueError unless ``x`` (named ``x_name``) is a 4-D float tensor,
    ``weight`` [E, Cout_max, Cin_max = x's channels] and ``bias`` [E, Cout_max] (or None) are of
    its dtype and device, and the widths are E ints in range (shared with the fused ops)."""
    check_tensor(x_name, x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=3, dtypes=(x.dtype,), device=x.device)
    num_experts, c_out = weight.shape[0], weight.shape[1]
    check_shape("weight", weight, (num_experts, c_out, x.shape[1]))
    if bias is not None:
        check_tensor("bias", bias, ndim=2, dtypes=(x.dtype,), device=x.device)
        check_shape("bias", bias, (num_experts, c_out))
    check_channels("in_channels", in_channels, num_experts, x.shape[1])
    check_channels("out_channels", out_channels, num_experts, c_out)


def grouped_pointwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Expert e's 1x1 convolution ``weight[e]`` (+ ``bias[e]``) on its rows, every expert in one call.

    Args:
        x: [N, Cin_max, H, W] float rows sorted by expert; expert e owns rows
            ``offsets[e]:offsets[e + 1]`` and reads their first ``in_channels[e]`` channels
            (the others are ignored).
        weight: [E, Cout_max, Cin_max] in x's dtype; expert e uses
            ``weight[e, :out_channels[e], :in_channels[e]]``, the entries outside are ignored.
        bias: [E, Cout_max] in x's dtype, or None.
        offsets: [E + 1] int64 / int32 row offsets on x's device (``RoutingPlan.offsets``).
        in_channels, out_channels: E ints each, in 1..Cin_max and 1..Cout_max.
        backend: "auto" (the Triton kernel on a GPU, else the reference), "reference" (one
            batched GEMM on MKL / cuBLAS over the padded layout, no host read) or "triton" (a
            grouped GEMM that skips each expert's padding). No C++ / CUDA kernel yet: a model on
            backend "cpu" / "cuda" runs the reference for this op.

    Returns:
        [N, Cout_max, H, W] in x's dtype, accumulated in float32 (float64 for float64 input);
        channels past ``out_channels[e]`` of expert e's rows are exact zeros. Differentiable in
        x, weight and bias; the weight and bias gradients sum each expert's rows in a fixed order.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape, channel counts out of
        range, offsets that are not a non-decreasing 0..N sequence (their values are checked for
        CPU tensors; on a GPU the ops trust offsets from a RoutingPlan, as checking would read
        them on the host).
    """
    check_pointwise_args("x", x, weight, bias, in_channels, out_channels)
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64, torch.int32), device=x.device)
    check_shape("offsets", offsets, (weight.shape[0] + 1,))
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        check_offsets_on_host(offsets, x.shape[0])
    chosen = resolve_backend("grouped_pointwise", backend, x.device)
    if chosen == "reference":
        return grouped_pointwise_reference(x, weight, bias, offsets, in_channels, out_channels)
    return implementation("grouped_pointwise", chosen)(
        x, weight, bias, offsets, list(in_channels), list(out_channels)
    )
