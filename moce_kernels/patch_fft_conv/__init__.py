"""``patch_fft_conv``: the complexity experts' "FFT attention" product, per p x p patch."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_shape, check_tensor
from moce_kernels.patch_fft_conv.reference import patch_fft_conv_reference

__all__ = ["patch_fft_conv", "patch_fft_conv_reference"]

#: What the Triton kernel (``grouped_patch_fft_conv``'s, shared) takes: patch sizes dividing its
#: 32 x 32 tiles; the dtypes whose products run on the tensor cores (what "auto" sends to it).
TRITON_PATCH_SIZES = (1, 2, 4, 8, 16, 32)
TRITON_TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)


def auto_takes_triton(dtype: torch.dtype, patch_sizes) -> bool:
    """Whether backend "auto", having resolved to Triton, runs the kernel for inputs of ``dtype``
    at ``patch_sizes``: 16-bit inputs (float32 spills there) and sizes dividing its tiles; else
    the reference (cuFFT)."""
    return dtype in TRITON_TENSOR_CORE_DTYPES and all(p in TRITON_PATCH_SIZES for p in patch_sizes)


def patch_fft_conv(q: torch.Tensor, k: torch.Tensor, patch: int, *, backend: str = "auto") -> torch.Tensor:
    """Circular convolution of ``q`` and ``k`` inside each ``patch`` x ``patch`` patch.

    Args:
        q, k: [B, C, H, W] float tensors of equal shape; zero-padded at the bottom/right to
            multiples of ``patch`` before being cut into patches.
        patch: patch size >= 1 (the experts use 4, 8, 16, 32).
        backend: "auto" (on a GPU the Triton kernel for 16-bit inputs and patch sizes dividing
            32, else the reference), "reference" (torch.fft) or "triton" (dense DFTs on [32, 32]
            tiles, ``grouped_patch_fft_conv``'s kernel with one group). No C++ / CUDA kernel.

    Returns:
        [B, C, H, W] float32 (the FFTs run in float32 whatever the input dtype).

    Raises:
        TypeError / ValueError: wrong rank, dtype, device or shape, patch < 1.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_shape("k", k, q.shape)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be an int >= 1, got {patch!r}")
    chosen = resolve_backend("patch_fft_conv", backend, q.device)
    if chosen == "triton" and backend == "auto" and not auto_takes_triton(q.dtype, (patch,)):
        chosen = "reference"
    if chosen == "reference":
        return patch_fft_conv_reference(q, k, patch)
    return implementation("patch_fft_conv", chosen)(q, k, patch)
