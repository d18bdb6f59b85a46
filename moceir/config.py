"""The two published configurations of MoCE-IR."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

_INT_FIELDS = (
    "dim",
    "in_channels",
    "out_channels",
    "num_refinement_blocks",
    "num_experts",
    "top_k",
    "expert_depth",
)
_TUPLE_FIELDS = ("num_blocks", "num_dec_blocks", "heads", "patch_sizes")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


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

    def __post_init__(self) -> None:
        """Check the types and the architecture's constraints; ValueError / TypeError name the
        field. Ints and int sequences are normalised to ``int`` and tuples (so that a config
        built from lists equals one read back from a checkpoint). ``top_k``, ``expert_depth`` and
        ``noise_std`` ranges are checked by the mixture-of-experts layer."""
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not _is_int(v):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
            object.__setattr__(self, name, int(v))
        for name in _TUPLE_FIELDS:
            v = getattr(self, name)
            if v is None and name == "patch_sizes":
                continue
            if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)) or not all(map(_is_int, v)):
                raise TypeError(f"{name} must be a tuple of ints, got {v!r}")
            object.__setattr__(self, name, tuple(int(x) for x in v))
        for name in ("ffn_expansion", "noise_std"):
            v = getattr(self, name)
            if v is None and name == "noise_std":
                continue
            if not _is_real(v):
                raise TypeError(f"{name} must be a number, got {type(v).__name__} ({v!r})")
            object.__setattr__(self, name, float(v))
        self._check_architecture()

    def _check_architecture(self) -> None:
        for name in ("dim", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.out_channels != self.in_channels:
            raise ValueError(
                f"out_channels must equal in_channels = {self.in_channels} (the network adds its "
                f"input to its output), got {self.out_channels}"
            )
        for name in ("num_blocks", "num_dec_blocks"):
            if any(n < 0 for n in getattr(self, name)):
                raise ValueError(f"{name} must hold block counts >= 0, got {getattr(self, name)}")
        if self.num_refinement_blocks < 0:
            raise ValueError(f"num_refinement_blocks must be >= 0, got {self.num_refinement_blocks}")
        levels = len(self.num_blocks)
        if levels < 2:
            raise ValueError(
                "num_blocks must have at least 2 entries (encoder levels, then the latent), "
                f"got {self.num_blocks}"
            )
        if len(self.heads) != levels or len(self.num_dec_blocks) != levels - 1:
            raise ValueError(
                f"heads must have {levels} entries and num_dec_blocks {levels - 1} (one per level), "
                f"got {self.heads} and {self.num_dec_blocks}"
            )
        if sum(self.num_dec_blocks) < 1:
            raise ValueError(
                f"num_dec_blocks must hold at least one block (the experts live in the decoder), "
                f"got {self.num_dec_blocks}"
            )
        if len(self.expert_patch_sizes()) != self.num_experts:
            raise ValueError(f"patch_sizes must have num_experts = {self.num_experts} entries")
        if any(p < 1 for p in self.expert_patch_sizes()):
            raise ValueError(f"patch_sizes must be >= 1, got {self.patch_sizes}")
        # Each down-sampling halves the channels (a 3x3 conv to width // 2) before a 2x2
        # pixel-unshuffle doubles them twice: the widths dim * 2**i must be even.
        if self.dim % 2:
            raise ValueError(
                "dim must be even (each down-sampling halves the width before a 2x2 "
                f"pixel-unshuffle), got {self.dim}"
            )
        for i, h in enumerate(self.heads):
            width = self.dim * 2**i
            if h < 1 or width % h:
                raise ValueError(
                    f"heads[{i}] = {h} must be >= 1 and divide the width of level {i}, "
                    f"dim * 2**{i} = {width} (dim = {self.dim})"
                )
        if self.num_experts >= 1 and self.dim < 2 ** (self.num_experts - 1):
            raise ValueError(
                f"dim must be >= 2**(num_experts - 1) = {2 ** (self.num_experts - 1)} (the smallest "
                f"expert's rank is dim // 2**(num_experts - 1), num_experts = {self.num_experts}), "
                f"got {self.dim}"
            )
        if not self.ffn_expansion > 0 or int(self.dim * self.ffn_expansion) < 1:
            raise ValueError(
                f"ffn_expansion must be > 0 with int(dim * ffn_expansion) >= 1 (the feed-forward "
                f"width), got {self.ffn_expansion} (dim = {self.dim})"
            )

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
