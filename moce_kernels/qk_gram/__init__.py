"""``qk_gram``: channel attention's ``q @ k^T`` and the squared norms of q's and k's rows, in one
pass over q and k."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_tensor
from moce_kernels.qk_gram.reference import qk_gram_reference

__all__ = ["qk_gram", "qk_gram_reference"]


def qk_gram(
    q: torch.Tensor, k: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q @ k^T, |q_i|^2, |k_j|^2)`` per image and head, reading q and k once.

    Channel attention (Restormer's MDTA) computes ``softmax(normalize(q) @ normalize(k)^T * t)``
    over [D, D] maps whose inner dimension is every pixel of the image; with these three results
    the normalisation is a division on the small map, ``gram / (|q| |k|^T)``, so q and k are never
    rewritten normalised and never read a second time for their norms.

    Args:
        q, k: [B, heads, D, N] float tensors of one shape, dtype and device (N: the pixels). Any
            strides with the last dimension contiguous are read in place (the chunks of a
            [B, 3C, H, W] qkv tensor, reshaped, are); other layouts are copied first.
        backend: "auto" (the Triton kernel on a GPU, else the reference), "reference" or
            "triton". No C++ / CUDA kernel.

    Returns:
        gram [B, heads, D, D], q_sq [B, heads, D], k_sq [B, heads, D] in float32 (float64 for
        float64 inputs): sums of the products of the inputs' values, accumulated in that dtype.
        The Triton kernel splits each sum over N into a fixed number of chunks (fixed by the
        shape and the GPU) and adds the chunks in a fixed order: the same bits on every run.
        Differentiable in q and k.

    Raises:
        TypeError / ValueError: not tensors, wrong rank, dtype, device or shape.
        RuntimeError: a backend that is not available here (says why).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    chosen = resolve_backend("qk_gram", backend, q.device)
    if chosen == "reference":
        return qk_gram_reference(q, k)
    return implementation("qk_gram", chosen)(q, k)
