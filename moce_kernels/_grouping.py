"""The "packed by rows" layout the grouped ops share, computed on the device.

N rows sorted by expert; expert e owns rows ``offsets[e]:offsets[e + 1]`` (``RoutingPlan.offsets``)
and the first ``channels[e]`` of C_max channels. The helpers here turn the offsets into per-row
facts without reading them on the host, so a path built on them never synchronises with a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows] int64: the expert of each row (``e`` with ``offsets[e] <= row < offsets[e + 1]``).

    On the device, no host read. Rows at or past ``offsets[-1]`` (never, for valid offsets) get
    E - 1, so that indexing with the result stays in bounds.
    """
    num_experts = offsets.shape[0] - 1
    row = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    expert = torch.searchsorted(offsets[1:].contiguous(), row, right=True)
    return expert.clamp_(max=max(num_experts - 1, 0))


def per_row(params: torch.Tensor, experts_of_rows: torch.Tensor) -> torch.Tensor:
    """[N, ...]: each row's expert's slice of ``params`` ([E, ...]), without a host read;
    ``experts_of_rows``: [N] from :func:`row_experts`.

    A select-and-sum over the experts rather than a gather, so that the gradient sums each
    expert's rows in a fixed order (no atomics), and rather than a one-hot matmul, so that a
    NaN / Inf in one expert's parameters reaches only that expert's rows.
    """
    rows, num_experts = experts_of_rows.shape[0], params.shape[0]
    mine = experts_of_rows[:, None] == torch.arange(num_experts, device=params.device)
    mine = mine.view(rows, num_experts, *([1] * (params.dim() - 1)))
    return torch.where(mine, params.unsqueeze(0), 0).sum(1)


@functools.lru_cache(maxsize=256)
def _mask(channels: tuple[int, ...], c_max: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(c_max) < torch.tensor(channels)[:, None]).to(device)  # copied once


def channel_mask(channels: Sequence[int], c_max: int, device: torch.device) -> torch.Tensor:
    """[E, C_max] bool: True on expert e's first ``channels[e]`` channels.

    Cached per configuration: the copy to the device happens at the first call only (run one
    forward before capturing a CUDA graph), and is a constant under torch.compile.
    """
    if torch.compiler.is_compiling():  # a constant of the graph: no cache to consult
        return torch.arange(c_max, device=device) < torch.tensor(list(channels), device=device)[:, None]
    return _mask(tuple(int(c) for c in channels), int(c_max), torch.device(device))


def check_offsets_on_host(offsets: torch.Tensor, rows: int) -> list[int]:
    """Raise ValueError unless ``offsets`` rise from 0 to ``rows``; return them as a host list.
    Reads them on the host: the fast paths call it for CPU tensors only (free there), and not
    while torch.compile traces; the per-expert references need the list anyway."""
    host = [int(o) for o in offsets.tolist()]
    if host[0] != 0 or host[-1] != rows or any(a > b for a, b in zip(host[:-1], host[1:], strict=True)):
        raise ValueError(f"offsets must rise from 0 to N = {rows}, got {host}")
    return host


def check_channels(name: str, channels: Sequence[int], num_experts: int, c_max: int) -> None:
    """Raise TypeError / ValueError unless ``channels`` holds E ints in 1..C_max."""
    if len(channels) != num_experts:
        raise ValueError(f"{name} must have E = {num_experts} entries, got {len(channels)}")
    for e, c in enumerate(channels):
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"{name}[{e}] must be an int, got {type(c).__name__}")
        if not 1 <= c <= c_max:
            raise ValueError(f"{name}[{e}] must be in 1..{c_max}, got {c}")
