"""The mixture of complexity experts in each decoder block: router, experts, auxiliary loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from moce_kernels import combine, dispatch, route
from moce_kernels._backend import op_backend
from moceir.layers.conv import PointwiseConv2d
from moceir.layers.experts import ComplexityExpert, run_experts
from moceir.layers.grouped_experts import run_experts_grouped
from moceir.layers.packing_cache import EvalCache

#: How an adapter runs its experts (``MoCELayer.expert_path``).
EXPERT_PATHS = ("auto", "per_expert", "sync_free")


class Router(nn.Module):
    """``logits = gate(avgpool(x)) + freq_gate(freq_emb)``; holds the experts' complexity buffer."""

    def __init__(self, dim: int, freq_dim: int, num_experts: int, complexity: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("complexity", complexity)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dim, num_experts, bias=False)
        )
        self.freq_gate = nn.Linear(freq_dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor) -> torch.Tensor:
        return self.gate(x) + self.freq_gate(freq_emb)


def _cv_squared(t: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 with Bessel's correction, as the official losses."""
    return (t.std() / (t.mean() + 1e-8)) ** 2


def routing_aux_loss(
    logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    k: int,
    noise_std: float,
    complexity: torch.Tensor | None,
) -> torch.Tensor:
    """``0.5 * importance loss + 0.5 * load loss`` of one adapter (training only).

    importance: ``cv^2(softmax(logits).sum(0) * complexity)``; load: the probability that each
    expert's clean logit plus noise beats the k-th largest noisy logit, ``cv^2`` of its mean.
    """
    importance = logits.softmax(dim=-1).sum(0)
    if complexity is not None:
        importance = importance * complexity
    threshold_index = torch.topk(noisy_logits, k, dim=-1).indices[:, -1:]  # [B, 1]
    threshold = noisy_logits.gather(1, threshold_index)
    z = (threshold - logits) / noise_std
    # 1 - Phi(z), written as torch.distributions.Normal(0, 1).cdf computes Phi.
    p_win = 1.0 - 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return 0.5 * _cv_squared(importance) + 0.5 * _cv_squared(p_win.mean(0))


class MoCELayer(nn.Module):
    """Routes each image to its top-k complexity experts and sums their gated outputs.

    ``out[b] = proj_out(sum_j gate[b, j] * expert_{e(b, j)}(x[b], shared[b]))``; each image is
    routed on its own at any batch size, and experts run only on the images routed to them.
    """

    def __init__(
        self,
        dim: int,
        freq_dim: int,
        ranks: Sequence[int],
        patch_sizes: Sequence[int],
        top_k: int = 1,
        expert_depth: int = 1,
        noise_std: float | None = None,
        complexity_bias: bool = True,
        eval_noise: bool = False,
    ) -> None:
        super().__init__()
        num_experts = len(ranks)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
        if expert_depth < 1:
            raise ValueError(f"expert_depth must be >= 1, got {expert_depth}")
        self.top_k = top_k
        self.expert_depth = expert_depth
        self.noise_std = 1.0 / num_experts if noise_std is None else float(noise_std)
        if not self.noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}")
        self.complexity_bias = complexity_bias
        self.eval_noise = eval_noise
        self.backend = "auto"
        self.expert_path = "auto"
        self._packed = EvalCache()  # packed expert parameters kept between eval forwards (both paths)
        # The extra ModuleList level reproduces the official keys ``experts.<e>.0.*``.
        self.experts = nn.ModuleList(
            nn.ModuleList([ComplexityExpert(dim, r, p)]) for r, p in zip(ranks, patch_sizes, strict=True)
        )
        self.proj_out = PointwiseConv2d(dim, dim, bias=False)
        sizes = torch.tensor([sum(p.numel() for p in ex.parameters()) for ex in self.experts])
        self.routing = Router(dim, freq_dim, num_experts, sizes / sizes.max())
        self.loss: torch.Tensor | None = None
        self.last_plan = None

    def uses_sync_free_path(self, x: torch.Tensor) -> bool:
        """Whether the experts run on the sync-free path for input ``x``.

        ``expert_path``: "per_expert" runs each expert on its own rows (the row counts are read
        on the host: one synchronisation per adapter on a GPU, the least work); "sync_free"
        runs all of them over routing-independent shapes (no host read with a fast backend, a
        fixed launch count, more work on padding); "auto" (the default) takes "sync_free" while
        torch.compile traces or a CUDA graph is being captured with a fast backend, else
        "per_expert".
        """
        if self.expert_path not in EXPERT_PATHS:
            raise ValueError(f"expert_path must be one of {EXPERT_PATHS}, got {self.expert_path!r}")
        if self.expert_path != "auto":
            return self.expert_path == "sync_free"
        if self.backend == "reference":
            return False
        if torch.compiler.is_compiling():  # first: Dynamo need not trace the capture query
            return True
        return x.is_cuda and torch.cuda.is_current_stream_capturing()

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        logits = self.routing(x, freq_emb)  # [B, E]
        noise = None
        if self.training or self.eval_noise:
            # The same draw as the official code (one randn_like per adapter and forward).
            noise = torch.randn_like(logits) * self.noise_std
        plan = route(logits, self.top_k, noise, backend=op_backend("route", self.backend))
        self.last_plan = plan
        if self.training:
            noisy = logits if noise is None else logits + noise
            complexity = self.routing.complexity if self.complexity_bias else None
            self.loss = routing_aux_loss(logits, noisy, self.top_k, self.noise_std, complexity)
        else:
            self.loss = logits.new_zeros((), dtype=torch.float32)
        experts = [ex[0] for ex in self.experts]
        if self.uses_sync_free_path(x):
            # Dispatch and combine are fused into the experts' first and last convolutions.
            y = run_experts_grouped(
                experts, x, shared, plan, self.expert_depth, self.backend, cache=self._packed
            )
        else:
            rows = run_experts(
                experts,
                dispatch(x, plan, backend=op_backend("dispatch", self.backend)),
                dispatch(shared, plan, backend=op_backend("dispatch", self.backend)),
                plan.offsets,
                self.expert_depth,
                self.backend,
                cache=self._packed,
            )
            y = combine(rows, plan, backend=op_backend("combine", self.backend))
        return self.proj_out(y)
