"""``channel_attention_map``: the whole map of Restormer's channel ("transposed") attention,
``softmax(normalize(q) @ normalize(k)^T * temperature)``, from one pass over q and k."""

from __future__ import annotations

import torch

from moce_kernels._backend import implementation, resolve_backend
from moce_kernels._checks import FLOAT_DTYPES, check_tensor
from moce_kernels.channel_attention_map.reference import channel_attention_map_reference

__all__ = ["channel_attention_map", "channel_attention_map_reference"]


def channel_attention_map(
    q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``softmax(normalize(q) @ normalize(k)^T * temperature)`` per image and head.

    The L2 normalisation (F.normalize over the pixels, eps 1e-12) is folded onto the small
    [D, D] map: ``(q @ k^T) / (max(|q_i|, eps) max(|k_j|, eps))``, the same function. The Triton
    backend computes q k^T and both norms in ``qk_gram``'s one pass over q and k, then one more
    kernel adds the pass's partial sums, divides by the norms, scales and takes the softmax:
    two launches for what the unfused form does in about a dozen (the sums, the norms, the
    division, the scaling, the softmax). The backward is likewise one small kernel over the
    maps, then ``qk_gram``'s backward kernel.

    Args:
        q, k: [B, heads, D, N] float tensors of one shape, dtype and device (N: the pixels). Any
            strides with the last dimension contiguous are read in place (the chunks of a
            [B, 3C, H, W] qkv tensor, reshaped, are); other layouts are copied first.
        temperature: ``heads`` float values on q's device, any shape (the model's parameter is
            [heads, 1, 1]); its gradient comes in its shape and dtype.
        backend: "auto" (the Triton kernels on a GPU, else the reference), "reference" or
            "triton". No C++ / CUDA kernel.

    Returns:
        [B, heads, D, D] in float32 (float64 for float64 inputs). The Triton kernels add each
        sum in a fixed order: the same bits on every run on one GPU. Differentiable in q, k and
        temperature (not twice).

    Raises:
        TypeError / ValueError: not tensors, wrong rank, dtype, device or shape, or not one
            temperature per head.
        RuntimeError: a backend that is not available here (says why).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    check_tensor("temperature", temperature, dtypes=FLOAT_DTYPES, device=q.device)
    if temperature.numel() != q.shape[1]:
        raise ValueError(
            f"temperature must hold one value per head (q.shape[1] = {q.shape[1]}), got shape "
            f"{tuple(temperature.shape)}"
        )
    chosen = resolve_backend("channel_attention_map", backend, q.device)
    if chosen == "reference":
        return channel_attention_map_reference(q, k, temperature)
    return implementation("channel_attention_map", chosen)(q, k, temperature)
