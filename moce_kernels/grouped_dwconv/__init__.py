"""``grouped_dwconv``: depthwise convolutions of experts of different widths and kernel sizes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_kernel_size, check_shape, check_tensor
from moce_kernels._grouping import check_offsets_on_host
from moce_kernels.grouped_dwconv.reference import grouped_dwconv_reference, pack_dwconv_weights, pack_rows

__all__ = ["grouped_dwconv", "grouped_dwconv_reference", "pack_dwconv_weights", "pack_rows"]


def grouped_dwconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    channels: Sequence[int],
    kernel_sizes: Sequence[int],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Depthwise "same" convolutions (stride 1, zero padding K_e // 2) of E experts in one call.

    Args:
        x: [N, C_max, H, W] float rows sorted by expert; expert e owns rows
            ``offsets[e]:offsets[e + 1]`` and their first ``channels[e]`` channels.
        weight: [E, C_max, K_max, K_max] packed kernels in x's dtype (see :func:`pack_dwconv_weights`);
            expert e's K_e x K_e kernel sits centred in the window; entries outside it are ignored.
        bias: [E, C_max] in x's dtype, or None.
        offsets: [E + 1] int64 row offsets (``RoutingPlan.offsets``), starting at 0, ending at N.
        channels: E ints, 1 <= channels[e] <= C_max.
        kernel_sizes: E odd ints in 3..9, each <= K_max (K_max odd).
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see ``moce_kernels.BACKENDS``).

    Returns:
        [N, C_max, H, W] in ``x``'s dtype; channels past ``channels[e]`` of expert e's rows are 0.
        Differentiable in ``x``, ``weight`` (zero outside each expert's kernel) and ``bias``.

    Raises:
        TypeError / ValueError: wrong rank, dtype, device or shape; an even or out-of-range kernel
        size; offsets that are not a non-decreasing 0..N sequence (checked on CPU tensors and by
        the reference backend; on a GPU the fast backends trust offsets from a RoutingPlan).
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=(x.dtype,), device=x.device)
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64, torch.int32), device=x.device)
    num_experts, c_max, k_max = weight.shape[0], x.shape[1], weight.shape[-1]
    check_shape("weight", weight, (num_experts, c_max, k_max, k_max))
    if bias is not None:
        check_tensor("bias", bias, ndim=2, dtypes=(x.dtype,), device=x.device)
        check_shape("bias", bias, (num_experts, c_max))
    check_shape("offsets", offsets, (num_experts + 1,))
    if len(channels) != num_experts or len(kernel_sizes) != num_experts:
        raise ValueError(
            f"channels and kernel_sizes must have E = {num_experts} entries, "
            f"got {len(channels)} and {len(kernel_sizes)}"
        )
    if k_max % 2 == 0:
        raise ValueError(f"weight's kernel window K_max must be odd, got {k_max}")
    for e, (c, k) in enumerate(zip(channels, kernel_sizes, strict=True)):
        check_kernel_size(f"kernel_sizes[{e}]", k)
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"channels[{e}] must be an int, got {type(c).__name__}")
        if k > k_max:
            raise ValueError(f"kernel_sizes[{e}] = {k} exceeds weight's window K_max = {k_max}")
        if not 1 <= c <= c_max:
            raise ValueError(f"channels[{e}] must be in 1..C_max = 1..{c_max}, got {c}")
    chosen = resolve_backend("grouped_dwconv", backend, x.device)
    if chosen == "reference":
        host_offsets = check_offsets_on_host(offsets, x.shape[0])  # the reference loops on them
        return grouped_dwconv_reference(x, weight, bias, host_offsets, channels, kernel_sizes)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # Checking the values reads them on the host: free on the CPU, a sync on a GPU, where
        # the fast backends trust offsets that come from a RoutingPlan.
        check_offsets_on_host(offsets, x.shape[0])
    return implementation("grouped_dwconv", chosen)(
        x, weight, bias, offsets, list(channels), list(kernel_sizes)
    )
