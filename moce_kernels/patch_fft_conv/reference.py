"""Pure-PyTorch definition of ``patch_fft_conv``: circular convolution of q and k inside patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_patches(t: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> zero-pad bottom/right to multiples of ``patch`` -> [B, C, h, w, p, p]."""
    b, c, height, width = t.shape
    pad_w, pad_h = (-width) % patch, (-height) % patch
    if pad_w or pad_h:  # F.pad copies even when it adds nothing
        t = F.pad(t, (0, pad_w, 0, pad_h))
    hp, wp = t.shape[-2] // patch, t.shape[-1] // patch
    return t.view(b, c, hp, patch, wp, patch).permute(0, 1, 2, 4, 3, 5)


def patch_fft_conv_reference(q: torch.Tensor, k: torch.Tensor, patch: int) -> torch.Tensor:
    """``irfft2(rfft2(q_patch) * rfft2(k_patch), s=(p, p))`` per p x p patch, in float32.

    q, k: [B, C, H, W] (any float dtype; computed in float32 as the official release does).
    Returns [B, C, H, W] float32: the patches reassembled and cropped back to H x W.
    """
    b, c, height, width = q.shape
    qp = _to_patches(q, patch).float()
    kp = _to_patches(k, patch).float()
    out = torch.fft.irfft2(torch.fft.rfft2(qp) * torch.fft.rfft2(kp), s=(patch, patch))
    hp, wp = out.shape[2], out.shape[3]
    out = out.permute(0, 1, 2, 4, 3, 5).reshape(b, c, hp * patch, wp * patch)
    return out[:, :, :height, :width]
