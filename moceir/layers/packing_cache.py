"""Packed expert parameters reused between eval forwards (both expert paths).

The grouped ops take every expert's parameters packed into one padded tensor; packing them is a
dozen small launches per call. With gradients on, packing is part of the autograd graph and runs
at every forward. Without (eval under ``no_grad`` / ``inference_mode``) the packed tensors are
kept and reused while no parameter was replaced or changed in place. Not while torch.compile
traces (it fuses the packing), nor while a CUDA graph is captured: the graph must pack at each
replay, so that weights updated in place between replays are the ones it uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


def cached_packing(
    cache: dict | None, name: str, params: Iterable[torch.Tensor], dtype: torch.dtype, build: Callable[[], T]
) -> T:
    """``build()``, or what it returned last time for ``name`` when the cache may serve (see the
    module docstring) and ``params`` (the tensors it packs) and ``dtype`` are unchanged."""
    if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return build()
    # Checked after is_compiling, so that Dynamo never traces the capture query.
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return build()
    key = (dtype, *((p.data_ptr(), p._version) for p in params))
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = cache[name] = (key, build())
    return entry[1]
