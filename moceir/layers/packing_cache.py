"""Packed expert parameters, and the trunk's parameters cast for autocast, reused between eval
forwards.

The grouped ops take every expert's parameters packed into one padded tensor; packing them is a
dozen small launches per call. Under autocast every convolution of ours casts its float32
weight and bias to the autocast dtype at each call (autocast itself recasts nn.Conv2d's
parameters at every forward too): some 500 small launches per MoCE-IR-S forward.

With gradients on, packing and casting are part of the autograd graph and run at every
forward. Without (eval under ``no_grad`` / ``inference_mode``) the packed or cast tensors are
kept and reused while no parameter was replaced or changed in place (a second copy of those
parameters in the autocast dtype, held by their modules). Not while torch.compile
traces (it fuses the packing), nor while a CUDA graph is captured: the graph must pack at each
replay, so that weights updated in place between replays are the ones it uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


class EvalCache(dict):
    """A module's cache of what its eval forwards keep. Never saved or copied with the module:
    pickling (``torch.save(model)``) or deep-copying it gives an empty cache, rebuilt from the
    parameters at the next eval forward (the entries hold weak references, which cannot be
    pickled, and would name the original's parameters in a copy)."""

    def __reduce__(self):
        return (EvalCache, ())


def cached_packing(
    cache: dict | None, name: str, params: Iterable[torch.Tensor], dtype: torch.dtype, build: Callable[[], T]
) -> T:
    """``build()``, or what it returned last time for ``name`` when the cache (an
    :class:`EvalCache`) may serve (see the module docstring) and ``params`` (the tensors it
    packs) and ``dtype`` are unchanged."""
    if cache is None or torch.is_grad_enabled() or compiling_or_capturing():
        return build()
    params = list(params)
    key = (dtype, *((p.data_ptr(), p._version) for p in params))
    entry = cache.get(name)
    # The tensors themselves too (weak references, so that the cache keeps none alive): a
    # parameter replaced by a new tensor (``load_state_dict(assign=True)``) whose memory happens
    # to start where the old one's did, at the same version, is not the same parameter.
    stale = entry is None or entry[0] != key
    if stale or any(ref() is not p for ref, p in zip(entry[1], params, strict=True)):
        entry = cache[name] = (key, [weakref.ref(p) for p in params], build())
    return entry[2]


def compiling_or_capturing() -> bool:
    """Whether torch.compile traces or a CUDA graph is being captured: then nothing is kept."""
    # is_compiling first, so that Dynamo never traces the capture query.
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def cached_value(cache: dict, name: str):
    """What ``cache`` holds for ``name`` (None when nothing): for tests and inspection."""
    entry = cache.get(name)
    return None if entry is None else entry[-1]


#: The attributes the modules keep their caches in (the adapters' packed experts, the
#: convolutions' autocast casts).
CACHE_ATTRIBUTES = ("_packed", "_casts")


def drop_caches(module: torch.nn.Module) -> None:
    """Empty the caches of ``module`` and its submodules, freeing their memory now."""
    for m in module.modules():
        for name in CACHE_ATTRIBUTES:
            cache = m.__dict__.get(name)
            if cache:
                cache.clear()
