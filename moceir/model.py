"""MoCE-IR: a Restormer-style U-Net whose decoder blocks hold mixtures of complexity experts."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moce_kernels._backend import check_available, preload
from moce_kernels._checks import FLOAT_DTYPES, check_finite, check_tensor
from moceir.config import CONFIG_FIELDS, CONFIGS, MoCEIRConfig
from moceir.layers.adapter import EXPERT_PATHS, MoCELayer
from moceir.layers.blocks import (
    DecoderBlock,
    DecoderGroup,
    Downsample,
    EncoderGroup,
    FrequencyEmbedding,
    Upsample,
)
from moceir.layers.conv import PointwiseConv2d
from moceir.layers.packing_cache import drop_caches

#: H and W must be multiples of this inside the network (three 2x down-samplings).
SIZE_MULTIPLE = 8


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Pad H, W at the bottom/right to multiples of ``multiple``: by reflection, or by replication
    where the image is too small to reflect (reflection needs the pad to be smaller than the side)."""
    pad_h, pad_w = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class MoCEIR(nn.Module):
    """The MoCE-IR network; ``state_dict()`` matches the official release key for key.

    Differences from the official code (all on by default, see the README):
    each image is routed on its own at any batch size; eval is deterministic unless
    ``eval_noise=True``; ``expert_depth`` > 1 chains; the model runs fully cast to bf16/fp16;
    any H x W works (reflect-padded to a multiple of 8, cropped back).

    After each forward, ``total_loss`` holds the routing auxiliary loss (sum over the decoder
    blocks / their number; 0 in eval). Training adds ``0.01 * model.total_loss``.
    """

    def __init__(self, config: MoCEIRConfig | None = None, backend: str = "auto", check_inputs: bool = True):
        super().__init__()
        cfg = MoCEIRConfig() if config is None else config
        if not isinstance(cfg, MoCEIRConfig):
            raise TypeError(f"config must be a MoCEIRConfig, got {type(cfg).__name__}")
        # The configuration checked its fields and their constraints (MoCEIRConfig.__post_init__).
        self.config = cfg
        self.check_inputs = check_inputs
        levels = len(cfg.num_blocks)
        dims = [cfg.dim * 2**i for i in range(levels)]

        # Registration order reproduces the official state-dict order.
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_channels, cfg.dim, 3, padding=1, bias=False)
        self.freq_embed = FrequencyEmbedding(dims[-1])
        self.enc = nn.ModuleList(
            nn.ModuleList(
                [
                    EncoderGroup(dims[i], cfg.heads[i], cfg.num_blocks[i], cfg.ffn_expansion),
                    Downsample(dims[i]),
                ]
            )
            for i in range(levels - 1)
        )
        self.latent = EncoderGroup(dims[-1], cfg.heads[-1], cfg.num_blocks[-1], cfg.ffn_expansion)
        self.dec = nn.ModuleList()
        for i in range(levels - 1):
            width_in, width = dims[levels - 1 - i], dims[levels - 2 - i]
            heads = cfg.heads[levels - 2 - i]
            blocks = [
                DecoderBlock(width, heads, cfg.ffn_expansion, False, self._adapter(width, dims[-1]))
                for _ in range(cfg.num_dec_blocks[i])
            ]
            self.dec.append(
                nn.ModuleList(
                    [Upsample(width_in), PointwiseConv2d(width_in, width, bias=False), DecoderGroup(blocks)]
                )
            )
        self.refinement = EncoderGroup(cfg.dim, cfg.heads[0], cfg.num_refinement_blocks, cfg.ffn_expansion)
        self.output = nn.Conv2d(cfg.dim, cfg.out_channels, 3, padding=1, bias=False)
        self.total_loss: torch.Tensor = torch.zeros(())
        self.backend = "auto"
        self.set_backend(backend)

    def _adapter(self, width: int, freq_dim: int) -> MoCELayer:
        cfg = self.config
        return MoCELayer(
            width,
            freq_dim,
            ranks=cfg.expert_ranks(width),
            patch_sizes=cfg.expert_patch_sizes(),
            top_k=cfg.top_k,
            expert_depth=cfg.expert_depth,
            noise_std=cfg.noise_std,
            complexity_bias=cfg.complexity_bias,
            eval_noise=cfg.eval_noise,
        )

    def adapters(self) -> list[MoCELayer]:
        """The mixture-of-experts layers, in forward order (deepest decoder level first)."""
        # Read off the decoder, not found by walking every module: the forward calls this, and
        # a walk of MoCE-IR-S's 1,336 modules took ~1 ms of host time per call on the CPU.
        return [block.adapter for _, _, group in self.dec for block in group.layers]

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half() make new parameters: drop the eval caches built from the old
        # ones now (moceir.layers.packing_cache), rather than hold their memory, on the old
        # device, until the next forward rebuilds them.
        drop_caches(self)
        return super()._apply(fn, recurse)

    def set_backend(self, backend: str) -> MoCEIR:
        """Choose the kernels the model runs with: "auto" (per op, the fastest available for the
        tensors' device), "reference" (pure PyTorch), "cpu" (C++ kernels), "cuda" or "triton".

        With "cpu", "cuda" or "triton", each op runs its kernel of that backend where it has one
        and its reference otherwise. Only the kernels change, never the parameters or the
        state dict. Raises ValueError for an unknown name and RuntimeError, saying why, for a
        backend that cannot run here (no GPU, extension not built, Triton missing).
        """
        check_available(backend)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        # Loaded now, so that torch.compile of the model never has to import one mid-trace.
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            preload(backend, torch.device(device))
        return self

    def set_expert_path(self, path: str) -> MoCEIR:
        """How the adapters run their experts: "auto" (the default), "per_expert" or "sync_free".

        "per_expert" runs each expert on its own images and reads their number on the host (one
        synchronisation per adapter on a GPU); "sync_free" runs every expert over shapes that do
        not depend on the routing (no host read with a fast backend: CUDA graphs can capture it
        and torch.compile traces it without a break, at the cost of work on padding); "auto"
        takes "sync_free" while compiling or capturing a CUDA graph, else "per_expert". The
        outputs agree to rounding. Raises ValueError for another name.
        """
        if path not in EXPERT_PATHS:
            raise ValueError(f"expert path must be one of {EXPERT_PATHS}, got {path!r}")
        for adapter in self.adapters():
            adapter.expert_path = path
        return self

    def set_trunk_fusion(self, enabled: bool) -> MoCEIR:
        """Whether the blocks may fuse their LayerNorms and skips into their 1x1 convolutions
        (``moce_kernels.fused_pointwise``; on by default: backend "triton" fuses, "auto" in
        GPU benchmark mode where timed faster). Off, every backend runs them unfused: for
        comparing numerics or memory traffic. The function is the same either way."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        for m in self.modules():
            if isinstance(m, PointwiseConv2d):
                m.fuse_neighbours = enabled
        return self

    def compile_dynamic(self) -> bool | None:
        """The ``dynamic`` argument ``torch.compile`` needs for this model as it is set now.

        False when an adapter runs the per-expert path while compiling (the reference backend,
        or ``set_expert_path("per_expert")``): its tensors' shapes follow the routing, and once
        Dynamo makes those sizes symbolic Inductor fails on them (torch 2.14 on the CPU: "cannot
        determine truth value of Relational" ordering a stride that holds an expert's image
        count; on an H100 with torch 2.11 the process aborted). Static shapes compile once per
        combination of image counts; past Dynamo's recompile limit a frame runs eagerly. None,
        torch's default, on the sync-free path, whose shapes do not depend on the routing.
        """
        per_expert = [a.expert_path == "per_expert" or a.backend == "reference" for a in self.adapters()]
        return False if any(per_expert) else None

    def routing_choices(self) -> list[torch.Tensor]:
        """The experts chosen by the last forward: one [B, k] int64 tensor per adapter."""
        return [a.last_plan.experts for a in self.adapters() if a.last_plan is not None]

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must have {self.config.in_channels} channels ([B, C, H, W]), got shape {tuple(x.shape)}"
            )
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(
                f"x must have height and width >= 1 (H, W of [B, C, H, W]), got shape {tuple(x.shape)}"
            )
        weight = self.patch_embed.proj.weight
        if x.device != weight.device:
            raise ValueError(
                f"x is on {x.device} but the model is on {weight.device}: "
                f"move it with x.to({str(weight.device)!r})"
            )
        # Under autocast the layers cast their inputs themselves.
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}: cast the input "
                f"with x.to({weight.dtype}) (or the model with model.to({x.dtype}))"
            )
        # Reading the check's result is a host sync: skipped while torch.compile traces (it
        # would break the graph) and while a CUDA graph is captured (it would fail the capture).
        if not (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
            check_finite("x", x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``x`` ([B, 3, H, W], float, any H x W >= 1 x 1, in the model's dtype and on its
        device); returns the same shape and dtype. An empty batch (B = 0) gives an empty output.

        Raises (when ``check_inputs``, the default) TypeError / ValueError naming ``x``: not a
        tensor, not 4-D, another channel count, an empty height or width, another device or dtype
        than the model's (outside autocast), NaN/Inf.
        """
        if self.check_inputs:
            self._check_input(x)
        height, width = x.shape[-2:]
        if x.shape[0] == 0:
            # Nothing to restore; the trunk cannot run it as is (torch's pixel_(un)shuffle return
            # an empty batch unshuffled). out_channels == in_channels: x has the output's shape.
            for adapter in self.adapters():
                adapter.last_plan, adapter.loss = None, x.new_zeros((), dtype=torch.float32)
            self.total_loss = x.new_zeros((), dtype=torch.float32)
            return x.clone()
        inp = pad_to_multiple(x)
        feats = self.patch_embed.proj(inp)
        skips = []
        for group, down in self.enc:
            feats = group(feats)
            skips.append(feats)
            feats = down(feats)
        feats = self.latent(feats)
        freq_emb = self.freq_embed(feats)
        for up, fuse, group in self.dec:
            feats = fuse(torch.cat([up(feats), skips.pop()], dim=1))
            feats = group(feats, freq_emb)
        feats = self.refinement(feats)
        out = self.output(feats) + inp
        adapters = self.adapters()
        self.total_loss = torch.stack([a.loss.float() for a in adapters]).sum() / len(adapters)
        return out[..., :height, :width]


def build_model(name: str = "moce_ir_s", backend: str = "auto", **overrides) -> MoCEIR:
    """Build ``"moce_ir_s"`` (11.5 M parameters) or ``"moce_ir"`` (25.4 M), randomly initialised.

    ``overrides`` replace fields of :class:`~moceir.config.MoCEIRConfig` (for example
    ``top_k=2``, ``noise_std=0.1``, ``complexity_bias=False``, ``eval_noise=True``).
    Load weights with :func:`moceir.load_checkpoint`.
    """
    if name not in CONFIGS:
        raise ValueError(f"name must be one of {sorted(CONFIGS)}, got {name!r}")
    unknown = set(overrides) - CONFIG_FIELDS
    if unknown:
        raise TypeError(f"unknown build_model arguments {sorted(unknown)}; valid: {sorted(CONFIG_FIELDS)}")
    return MoCEIR(dataclasses.replace(CONFIGS[name], **overrides), backend=backend)
