"""The paper's training loss: ``L1 + 0.1 * FFT L1 + 0.01 * routing auxiliary loss``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def fft_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the real and imaginary parts of ``rfft2`` over H, W (the
    official ``FFTLoss`` before its weight), computed in float32."""
    p = torch.fft.rfft2(pred.float(), dim=(-2, -1))
    t = torch.fft.rfft2(target.float(), dim=(-2, -1))
    return F.l1_loss(torch.view_as_real(p), torch.view_as_real(t))


@dataclass(frozen=True)
class LossWeights:
    l1: float = 1.0
    fft: float = 0.1
    aux: float = 0.01


def restoration_loss(
    pred: torch.Tensor, target: torch.Tensor, aux: torch.Tensor, weights: LossWeights = LossWeights()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, parts)``: total = ``l1 * L1 + fft * FFT + aux * aux``; parts unweighted, detached."""
    l1 = F.l1_loss(pred.float(), target.float())
    fft = fft_l1(pred, target)
    total = weights.l1 * l1 + weights.fft * fft + weights.aux * aux.float()
    return total, {"l1": l1.detach(), "fft": fft.detach(), "aux": aux.detach().float()}
