"""Pure-PyTorch definition of ``route``: logits -> top-k gates and a device-side plan."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingPlan(NamedTuple):
    """How a batch is routed to its experts. B images, E experts, k choices, S = B * k slots.

    A *slot* ``s = b * k + j`` is image ``b``'s ``j``-th choice. All fields live on the device
    of the logits; building them reads nothing on the host.
    """

    #: [B, k] float32: the top-k softmax probabilities of the (noisy) logits, NOT renormalised.
    gates: torch.Tensor
    #: [B, k] int64: the chosen experts, by decreasing gate.
    experts: torch.Tensor
    #: [B, E] float32: softmax of the clean logits (for the importance loss).
    probs: torch.Tensor
    #: [B, E] float32: logits + noise (equal to the logits when no noise is given).
    noisy_logits: torch.Tensor
    #: [E] int64: number of slots routed to each expert.
    counts: torch.Tensor
    #: [E + 1] int64: exclusive prefix sum of ``counts``; expert e owns sorted rows
    #: ``offsets[e]:offsets[e + 1]``.
    offsets: torch.Tensor
    #: [S] int64: slot ids sorted by expert (stable: by image, then choice, inside an expert).
    sorted_slots: torch.Tensor
    #: [S] int64: the image of each sorted row (``sorted_slots // k``).
    sorted_images: torch.Tensor
    #: [S] int64: ``inverse[s]`` is the sorted row of slot ``s``.
    inverse: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def k(self) -> int:
        return self.experts.shape[1]

    @property
    def batch_size(self) -> int:
        return self.experts.shape[0]


def route_reference(logits: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> RoutingPlan:
    """See :func:`moce_kernels.route` (arguments are assumed valid here)."""
    batch, num_experts = logits.shape
    clean = logits.float()
    noisy = clean if noise is None else clean + noise.float()
    probs = clean.softmax(dim=-1)
    # The gates are the top-k of softmax(noisy logits), as in the official release.
    gates, experts = torch.topk(noisy.softmax(dim=-1), k, dim=-1)

    flat = experts.reshape(-1)  # [S]
    # counts without bincount/one_hot: both can read the device on the host.
    counts = (flat.unsqueeze(1) == torch.arange(num_experts, device=flat.device)).sum(0)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    sorted_slots = torch.sort(flat, stable=True).indices
    inverse = torch.empty_like(sorted_slots)
    inverse[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    return RoutingPlan(
        gates=gates,
        experts=experts,
        probs=probs,
        noisy_logits=noisy,
        counts=counts,
        offsets=offsets,
        sorted_slots=sorted_slots,
        sorted_images=torch.div(sorted_slots, k, rounding_mode="floor"),
        inverse=inverse,
    )
