"""``grouped_patch_fft_conv``: the experts' patch-wise FFT product, each at its own patch size."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor
from moce_kernels._grouping import check_channels, check_offsets_on_host
from moce_kernels.grouped_patch_fft_conv.reference import grouped_patch_fft_conv_reference
from moce_kernels.patch_fft_conv import auto_takes_triton

__all__ = ["grouped_patch_fft_conv", "grouped_patch_fft_conv_reference"]


def grouped_patch_fft_conv(
    q: torch.Tensor,
    k: torch.Tensor,
    offsets: torch.Tensor,
    channels: Sequence[int],
    patch_sizes: Sequence[int],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``patch_fft_conv(q, k, patch_sizes[e])`` on expert e's rows and channels, all rows at once.

    Args:
        q, k: [N, C_max, H, W] float rows sorted by expert, of equal shape; expert e owns rows
            ``offsets[e]:offsets[e + 1]`` and their first ``channels[e]`` channels (the others
            are ignored).
        offsets: [E + 1] int64 / int32 row offsets on q's device (``RoutingPlan.offsets``).
        channels: E ints in 1..C_max.
        patch_sizes: E ints >= 1 (the experts use 4, 8, 16, 32).
        backend: "auto" (on a GPU the Triton kernel for 16-bit inputs and patch sizes dividing
            32, else the reference), "reference" (torch.fft over routing-independent shapes, no
            host read: one FFT pass per distinct patch size) or "triton" (each row at its own
            patch size only, as dense DFTs on [32, 32] tiles: q and k read once, the result
            written once; 16-bit inputs on TF32 tensor cores, ~1e-3 of the output's scale from
            the reference; float32 products otherwise). No C++ / CUDA kernel.

    Returns:
        [N, C_max, H, W] float32; channels past ``channels[e]`` of expert e's rows are zeros.
        Differentiable in q and k.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype, device or shape, channel counts or patch
        sizes out of range, offsets that are not a non-decreasing 0..N sequence (values checked
        for CPU tensors only: on a GPU that would read them on the host).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_shape("k", k, q.shape)
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64, torch.int32), device=q.device)
    num_experts = offsets.shape[0] - 1
    if num_experts < 1:
        raise ValueError(f"offsets must have E + 1 >= 2 entries, got shape {tuple(offsets.shape)}")
    check_channels("channels", channels, num_experts, q.shape[1])
    if len(patch_sizes) != num_experts:
        raise ValueError(f"patch_sizes must have E = {num_experts} entries, got {len(patch_sizes)}")
    for e, p in enumerate(patch_sizes):
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"patch_sizes[{e}] must be an int >= 1, got {p!r}")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        check_offsets_on_host(offsets, q.shape[0])
    chosen = resolve_backend("grouped_patch_fft_conv", backend, q.device)
    if chosen == "triton" and backend == "auto" and not auto_takes_triton(q.dtype, patch_sizes):
        chosen = "reference"
    if chosen == "reference":
        return grouped_patch_fft_conv_reference(q, k, offsets, channels, patch_sizes)
    return implementation("grouped_patch_fft_conv", chosen)(q, k, offsets, list(channels), list(patch_sizes))
