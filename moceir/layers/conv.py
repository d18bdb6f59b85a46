"""The trunk's depthwise and 1x1 convolutions, backed by ``moce_kernels.grouped_dwconv`` and
``moce_kernels.grouped_pointwise`` (one group each).

Both keep ``nn.Conv2d``'s parameters and state-dict keys. With ``backend="auto"`` on a GPU each
has candidates: our kernel(s) and cuDNN's, and for 1x1 a batched cuBLAS GEMM; in benchmark mode
(``torch.backends.cudnn.benchmark``) the first call of each shape times them and keeps the
fastest (:mod:`moceir.layers.tuning`), otherwise each runs its default: our depthwise kernel
(cuDNN's bf16 depthwise 3x3 took 37% of a 1080p frame on an H200) and cuDNN's 1x1 convolution.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

from moce_kernels import attention_projection_fold, fused_pointwise, grouped_dwconv, grouped_pointwise
from moce_kernels._backend import op_backend, resolve_backend, triton_usable
from moceir.layers import tuning
from moceir.layers.packing_cache import EvalCache, cached_packing, compiling_or_capturing

if TYPE_CHECKING:
    from moceir.layers.norm import LayerNorm2d


class _AutocastOperands:
    def autocast_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, weight, bias) as nn.Conv2d would compute with them: under autocast, in the autocast
        dtype (see :meth:`params_in`)."""
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            weight, bias = self.params_in(dtype)
        return x, weight, bias

    def params_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) cast to ``dtype``: differentiable casts with gradients on (the float32
        parameters get their gradients); without, the casts are kept between forwards while the
        parameters are unchanged (``moceir.layers.packing_cache``)."""
        weight, bias = self.weight, self.bias
        if weight.dtype == dtype and (bias is None or bias.dtype == dtype):
            return weight, bias
        params = [weight] if bias is None else [weight, bias]

        def cast() -> tuple[torch.Tensor, torch.Tensor | None]:
            return weight.to(dtype), None if bias is None else bias.to(dtype)

        return cached_packing(self.eval_cache(), "autocast", params, dtype, cast)

    def eval_cache(self) -> EvalCache:
        """What this convolution's eval forwards keep (``moceir.layers.packing_cache``): a plain
        attribute, not in the state dict, made on first use."""
        cache = self.__dict__.get("_casts")
        if cache is None:
            cache = self.__dict__["_casts"] = EvalCache()
        return cache


#: :meth:`PointwiseConv2d.attend` folds the attention map into the projection for images of at
#: least this many pixels per channel.
FOLD_MIN_PIXELS_PER_CHANNEL = 8


def _one_group(x: torch.Tensor) -> torch.Tensor:
    """Offsets [0, N]: every row in one group, made on the device (no host-to-device copy, so
    CUDA graphs can capture it). Outside torch.compile and CUDA graph capture, kept per (N,
    device): two launches fewer per convolution call (some 280 of the ~1,400 kernel launches of
    a MoCE-IR-S forward). A graph makes its own, so that it never reads memory the cache may
    free."""
    if compiling_or_capturing():
        return torch.arange(2, device=x.device) * x.shape[0]
    return _group_offsets(x.shape[0], x.device)


@functools.lru_cache(maxsize=64)
def _group_offsets(rows: int, device: torch.device) -> torch.Tensor:
    # A normal tensor even under inference_mode: the ops' backward saves the offsets, and an
    # inference tensor cannot be saved for backward by a later training step.
    with torch.inference_mode(False):
        return torch.arange(2, device=device) * rows


def tuning_key(kind: str, x: torch.Tensor, conv: nn.Conv2d) -> tuple:
    """What a timed choice depends on: the call's shapes, operand dtype (autocast's when on) and
    device."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return (
        kind,
        tuple(x.shape),
        dtype,
        conv.out_channels,
        conv.kernel_size[0],
        conv.bias is not None,
        x.device,
    )


class DepthwiseConv2d(_AutocastOperands, nn.Conv2d):
    """``nn.Conv2d(C, C, k, padding=k // 2, groups=C)``: same parameters and state-dict keys.

    With a fast backend the convolution runs as one group of ``grouped_dwconv`` (on a GPU
    cuDNN's depthwise kernels are far from the memory roofline, in bf16 especially; in benchmark
    mode "auto" times our CUDA and Triton kernels and cuDNN's there); with
    ``backend="reference"`` it is the plain ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool) -> None:
        super().__init__(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias
        )
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = op_backend("grouped_dwconv", self.backend)
        # The reference path (and inputs grouped_dwconv does not take) keep nn.Conv2d's own
        # behaviour and errors; the operands are cast only past this check (nn.Conv2d casts its
        # own under autocast: casting here too would charge the reference a copy it never makes).
        if backend == "reference" or x.dim() != 4 or x.shape[1] != self.in_channels:
            return super().forward(x)
        xc, weight, bias = self.autocast_operands(x)
        if xc.dtype != weight.dtype:
            return super().forward(x)
        resolved = resolve_backend("grouped_dwconv", "auto", x.device) if backend == "auto" else backend
        if backend == "auto" and x.is_cuda and resolved != "reference" and tuning.in_use(x):
            candidates = {
                "kernel": lambda: self._kernel(xc, weight, bias, backend),
                "cudnn": lambda: nn.Conv2d.forward(self, x),
            }
            if resolved != "triton" and triton_usable()[0]:
                # Our other kernel of the op: shapes differ in which of the two runs faster.
                candidates["triton"] = lambda: self._kernel(xc, weight, bias, "triton")
            chosen = tuning.choose(tuning_key("depthwise", x, self), candidates, "kernel", x)
            if chosen == "cudnn":
                return super().forward(x)
            backend = "triton" if chosen == "triton" else backend
        return self._kernel(xc, weight, bias, backend)

    def _kernel(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        c, k = self.in_channels, self.kernel_size[0]
        bias = None if bias is None else bias.view(1, c)
        with torch.autocast(x.device.type, enabled=False):
            return grouped_dwconv(
                x.contiguous(), weight.view(1, c, k, k), bias, _one_group(x), [c], [k], backend=backend
            )


class PointwiseConv2d(_AutocastOperands, nn.Conv2d):
    """``nn.Conv2d(C_in, C_out, 1)``: same parameters and state-dict keys.

    ``backend="triton"`` runs it as one group of ``grouped_pointwise`` (a GEMM over NCHW with
    the bias in its store); "auto" on a GPU runs cuDNN's convolution, or in benchmark mode
    whichever of three its first call of a shape timed fastest: cuDNN's, ours, and one batched
    cuBLAS GEMM over the images as they lie (NCHW is [C_in, H * W] per image: no layout change)
    with the bias added after it. The other backends (no C++ or CUDA kernel of ours) run
    ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.backend = "auto"
        #: Whether :meth:`fused` may fuse (``MoCEIR.set_trunk_fusion``).
        self.fuse_neighbours = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = op_backend("grouped_pointwise", self.backend)
        if backend == "reference" or x.dim() != 4 or x.shape[1] != self.in_channels:
            return super().forward(x)  # and nn.Conv2d's own errors for inputs it does not take
        if backend != "auto":
            return self._kernel(*self.autocast_operands(x), backend)
        if (
            x.is_cuda
            and tuning.in_use(x)
            and resolve_backend("grouped_pointwise", "auto", x.device) != "reference"
        ):
            # The operands are cast only where the kernel runs (cuDNN's path casts its own).
            def kernel():
                return self._kernel(*self.autocast_operands(x), "auto")

            def gemm():
                return self._gemm(*self.autocast_operands(x))

            candidates = {"cudnn": lambda: nn.Conv2d.forward(self, x), "kernel": kernel, "cublas": gemm}
            chosen = tuning.choose(tuning_key("pointwise", x, self), candidates, "cudnn", x)
            if chosen == "kernel":
                return kernel()
            if chosen == "cublas":
                return gemm()
        return super().forward(x)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution as ``W @ x[n]`` for every image n (one batched GEMM: cuBLAS on a GPU),
        then the bias, in (x, weight)'s dtype (autocast's operands: see autocast_operands)."""
        if x.dtype != weight.dtype:
            return nn.Conv2d.forward(self, x)  # nn.Conv2d's own error
        n, _, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            y = torch.matmul(
                weight.view(self.out_channels, self.in_channels), x.reshape(n, self.in_channels, h * w)
            )
            if bias is not None:
                y = y + bias.view(1, self.out_channels, 1)
        return y.view(n, self.out_channels, h, w)

    def _kernel(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        if x.dtype != weight.dtype:
            return nn.Conv2d.forward(self, x)  # nn.Conv2d's own error
        c_in, c_out = self.in_channels, self.out_channels
        bias = None if bias is None else bias.view(1, c_out)
        with torch.autocast(x.device.type, enabled=False):
            return grouped_pointwise(
                x.contiguous(),
                weight.view(1, c_out, c_in),
                bias,
                _one_group(x),
                [c_in],
                [c_out],
                backend=backend,
            )

    def fused(
        self, x: torch.Tensor, norm: LayerNorm2d | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``self(norm(x)) + residual`` (each part optional): the trunk's LayerNorm -> 1x1 and
        1x1 -> residual add, as one ``moce_kernels.fused_pointwise`` where the backend allows.

        ``backend="triton"`` always fuses (the 1x1 convolution is a Triton GEMM there anyway: the
        fusion only removes memory traffic). "auto" on a GPU fuses in benchmark mode when the
        fused kernel timed faster than the unfused layers for the shape (cuDNN's 1x1 convolution
        after our LayerNorm, unmeasured against the fusion), and runs unfused otherwise; every
        other backend (no C++ / CUDA kernel of the fusion) runs unfused. ``norm``'s own forward
        (and its hooks) does not run when fused: its parameters are read directly.
        """
        backend = self._fusion_choice(x, norm, residual)
        if backend is not None:
            return self._fused_kernel(x, norm, residual, backend)
        return self._unfused(x, norm, residual)

    def fuses_norm(self, x: torch.Tensor, norm: LayerNorm2d) -> bool:
        """Whether ``self.fused(x, norm)`` runs fused (for callers that would otherwise share one
        ``norm(x)`` between several convolutions)."""
        return self._fusion_choice(x, norm, None) is not None

    def attend(
        self, v: torch.Tensor, attn: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``self(attn @ v) + residual``: channel attention's output projection (``attn``
        [B, heads, C/heads, C/heads], v [B, C, H, W], C = in_channels).

        Where :meth:`fused` would fuse, ``attn @ v`` never goes to memory: the projection is
        folded with each image's map, ``W_b = W @ blockdiag(attn_b)`` ([C_out, C] per image, in
        the product's dtype), and ``fused_pointwise`` runs ``W_b @ v + bias +
        residual`` reading v in place (a chunk of the qkv tensor). The same function; it rounds
        W_b where the unfused layers round ``attn @ v``. Only for images of at least
        ``FOLD_MIN_PIXELS_PER_CHANNEL`` pixels per channel (else unfused).
        """
        ok = v.dim() == 4 and attn.dim() == 4 and attn.shape[0] == v.shape[0]
        ok = ok and attn.shape[1] * attn.shape[2] == v.shape[1]
        # The folded weights cost ~C_out * C per image: they pay where the image has many more
        # pixels than channels (the byte counter: at 8 x 8 pixels and 384 channels they moved
        # more than attn @ v's output).
        ok = ok and v.shape[2] * v.shape[3] >= FOLD_MIN_PIXELS_PER_CHANNEL * v.shape[1]
        backend = self._fusion_choice(v, None, residual, attn=attn) if ok else None
        if backend is not None:
            return self._attend_kernel(v, attn, residual, backend)
        return self._unfused(apply_attention(v, attn), None, residual)

    def _unfused(
        self, x: torch.Tensor, norm: LayerNorm2d | None, residual: torch.Tensor | None
    ) -> torch.Tensor:
        y = self(x if norm is None else norm(x))
        return y if residual is None else y + residual

    def _fusion_choice(
        self,
        x: torch.Tensor,
        norm: LayerNorm2d | None,
        residual: torch.Tensor | None,
        attn: torch.Tensor | None = None,
    ) -> str | None:
        """The backend that runs the call fused, or None for the unfused layers: :meth:`fused`'s
        (``attn`` None) or :meth:`attend`'s."""
        backend = self._fusion_backend(x, norm, residual)
        if backend is None or (norm is None and residual is None and attn is None):
            return None
        if self.backend != "auto":
            return backend
        if not (x.is_cuda and tuning.in_use(x)):
            return None
        if attn is not None:
            kind = "pointwise-attention"
            candidates = {
                "unfused": lambda: self._unfused(apply_attention(x, attn), None, residual),
                "fused": lambda: self._attend_kernel(x, attn, residual, backend),
            }
        else:
            kind = "pointwise-norm" if norm is not None else "pointwise"
            candidates = {
                "unfused": lambda: self._unfused(x, norm, residual),
                "fused": lambda: self._fused_kernel(x, norm, residual, backend),
            }
        if residual is not None:
            kind += "-residual"
        chosen = tuning.choose(tuning_key(kind, x, self), candidates, "unfused", x)
        return backend if chosen == "fused" else None

    def _fusion_backend(
        self, x: torch.Tensor, norm: LayerNorm2d | None, residual: torch.Tensor | None
    ) -> str | None:
        """The concrete backend of ``fused_pointwise`` for this call, or None to run unfused:
        the reference, and inputs the unfused layers treat otherwise (their own errors, a
        residual that broadcasts, a dtype nn.Conv2d refuses)."""
        backend = op_backend("fused_pointwise", self.backend)
        if not self.fuse_neighbours or backend == "reference":
            return None
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            return None
        autocast = torch.is_autocast_enabled(x.device.type)
        if not x.is_floating_point() or (not autocast and x.dtype != self.weight.dtype):
            return None
        out_shape = (x.shape[0], self.out_channels, *x.shape[2:])
        if residual is not None and (residual.shape != out_shape or not residual.is_floating_point()):
            return None
        if norm is not None and norm.body.weight.shape != (self.in_channels,):
            return None
        if backend == "auto":
            backend = resolve_backend("fused_pointwise", "auto", x.device)
        return None if backend == "reference" else backend

    def product_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) as the convolution computes with them: under autocast, in its dtype. x
        stays as it is: fused_pointwise rounds its (normalised) values to the weight's dtype, as
        autocast rounds the convolution's input."""
        if torch.is_autocast_enabled(x.device.type):
            return self.params_in(torch.get_autocast_dtype(x.device.type))
        return self.weight, self.bias

    def _fused_kernel(
        self, x: torch.Tensor, norm: LayerNorm2d | None, residual: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        weight, bias = self.product_operands(x)
        norm_args = {}
        if norm is not None:
            norm_args = dict(norm_weight=norm.body.weight, norm_bias=norm.body.bias, eps=norm.eps)
        with torch.autocast(x.device.type, enabled=False):
            return fused_pointwise(
                x,
                weight.view(self.out_channels, self.in_channels),
                bias,
                residual=residual,
                backend=backend,
                **norm_args,
            )

    def _attend_kernel(
        self, v: torch.Tensor, attn: torch.Tensor, residual: torch.Tensor | None, backend: str
    ) -> torch.Tensor:
        weight, bias = self.product_operands(v)
        with torch.autocast(v.device.type, enabled=False):
            # W_b = W @ blockdiag(attn_b) in the product's dtype (the map rounded to it as for
            # attn @ v; summed in float32 and rounded once), one launch where it has a kernel.
            fold_backend = resolve_backend(
                "attention_projection_fold", op_backend("attention_projection_fold", self.backend), v.device
            )
            folded = attention_projection_fold(
                weight.view(self.out_channels, self.in_channels), attn, backend=fold_backend
            )
            return fused_pointwise(v, folded, bias, residual=residual, backend=backend)


def apply_attention(v: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``attn @ v`` per head: [B, heads, d, d] maps on [B, heads * d, H, W] (in v's dtype)."""
    b, c, h, w = v.shape
    heads = attn.shape[1]
    return (attn.to(v.dtype) @ v.reshape(b, heads, c // heads, h * w)).reshape(b, c, h, w)
