"""``patch_fft_conv`` in Triton: ``grouped_patch_fft_conv``'s kernels with one group (every row
and channel at the one patch size), so the per-expert path gets the same dense-DFT kernels."""

from __future__ import annotations

import torch

from moce_kernels.grouped_patch_fft_conv.triton import grouped_patch_fft_conv_triton


def patch_fft_conv_triton(q: torch.Tensor, k: torch.Tensor, patch: int) -> torch.Tensor:
    """``moce_kernels.patch_fft_conv`` with the Triton kernels (a GPU, or the interpreter);
    arguments validated by the public function, ``patch`` dividing 32."""
    # Offsets [0, N] made on the device: no host-to-device copy (CUDA-graph safe).
    offsets = torch.arange(2, device=q.device) * q.shape[0]
    return grouped_patch_fft_conv_triton(q, k, offsets, [q.shape[1]], [patch])
