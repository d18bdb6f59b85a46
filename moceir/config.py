"""The two published configurations of MoCE-IR."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class MoCEIRConfig:
    """Hyper-parameters of the network (defaults: the paper's, with base width ``dim``)."""

    dim: int = 32
    in_channels: int = 3
    out_channels: int = 3
    #: encoder blocks per level (3 levels) and in the latent.
    num_blocks: tuple[int, ...] = (4, 6, 6, 8)
    #: decoder blocks per level, deepest first.
    num_dec_blocks: tuple[int, ...] = (4, 4, 2)
    num_refinement_blocks: int = 4
    #: attention heads per level, shallow to deep.
    heads: tuple[int, ...] = (1, 2, 4, 8)
    ffn_expansion: float = 2.0
    num_experts: int = 4
    top_k: int = 1
    #: FFT patch size of each expert (4, 8, 16, 32 for 4 experts).
    patch_sizes: tuple[int, ...] | None = None
    expert_depth: int = 1
    #: std of the routing noise; None means 1 / num_experts.
    noise_std: float | None = None
    #: weight the importance loss by the experts' complexity (the paper's bias to cheap experts).
    complexity_bias: bool = True
    #: keep routing noise in eval mode, as the official release does (random inference).
    eval_noise: bool = False

    def expert_patch_sizes(self) -> tuple[int, ...]:
        if self.patch_sizes is not None:
            return tuple(self.patch_sizes)
        return tuple(2 ** (i + 2) for i in range(self.num_experts))

    def expert_ranks(self, width: int) -> tuple[int, ...]:
        """Ranks C/2^(E-1) .. C/2, C of the experts at a level of width C ("spread")."""
        return tuple(width // 2**i for i in range(self.num_experts))[::-1]


CONFIGS: dict[str, MoCEIRConfig] = {
    "moce_ir_s": MoCEIRConfig(dim=32),
    "moce_ir": MoCEIRConfig(dim=48),
}

CONFIG_FIELDS = {f.name for f in fields(MoCEIRConfig)}
