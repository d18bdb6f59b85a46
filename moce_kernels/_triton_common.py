"""Helpers the Triton bindings share: buffers, the launch device, accumulation dtypes, and the
device-side lookup of a packed row's expert (``moce_kernels._grouping``'s layout)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer that a kernel fills completely (the tests swap in NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (a no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def acc_dtype(*tensors: torch.Tensor | None) -> tuple[torch.dtype, tl.dtype]:
    """The accumulation dtype of kernels over ``tensors`` (None skipped): float64 when any is
    float64 (gradcheck), else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def interpreted() -> bool:
    """Whether Triton runs through its CPU interpreter (the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=256)
def expert_metadata(first: tuple[int, ...], second: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[2 * E] int32 on ``device``: two per-expert integers (e.g. widths, kernel sizes).

    Cached: the same few expert configurations come back at every call, and copying a fresh host
    list to the GPU each time would be a synchronous copy per call. The first call of a
    configuration does that copy, so run one before capturing a CUDA graph.
    """
    return torch.tensor([*first, *second], dtype=torch.int32).to(device)


@triton.jit
def expert_of_row(off_ptr, meta_ptr, row, E, BLOCK_E: tl.constexpr):
    """(expert, meta[e], meta[E + e]) of a packed row, from the device offsets (rows sorted by
    expert) and an :func:`expert_metadata` tensor."""
    es = tl.arange(0, BLOCK_E)
    ends = tl.load(off_ptr + 1 + es, mask=es < E, other=0)
    # How many experts' rows end at or before this row; offsets that do not end at N would give
    # E, so clamp to stay inside the metadata.
    e = tl.minimum(tl.sum(((ends <= row) & (es < E)).to(tl.int32), 0), E - 1)
    return e, tl.load(meta_ptr + e), tl.load(meta_ptr + E + e)


#: Elements of one image (or row) from which int32 offsets inside it would wrap.
INT32_OFFSET_LIMIT = 2**31


def int64_offsets(*numels: int) -> bool:
    """Whether a kernel indexing inside images of these element counts needs int64 offsets (the
    kernels that take an ``INT64_OFFSETS`` flag compile that variant only for such inputs)."""
    return max(numels, default=0) >= INT32_OFFSET_LIMIT


def check_int32_offsets(op: str, name: str, numel: int, shape: tuple[int, ...]) -> None:
    """ValueError for a kernel that indexes inside an image or row with int32 offsets when one
    has ``INT32_OFFSET_LIMIT`` or more elements (the offsets would wrap: wrong memory)."""
    if numel >= INT32_OFFSET_LIMIT:
        raise ValueError(
            f"{op}: an image (row) of {name} must have fewer than 2**31 elements for the Triton "
            f"kernel, got {numel} ({shape}); use backend='reference', or restore the image in tiles "
            "(moceir's Restorer, tile=...)"
        )


# --- launch grids -------------------------------------------------------------------------------
# Every Triton launch here uses a 1-d grid: CUDA allows 2**31 - 1 programs on a grid's first
# dimension but only 65535 on the second and third, which a second "rows" or "chunks" axis passes
# for large images or batches (tests/ops/test_launch_grids.py holds every kernel to this).


@triton.jit
def row_chunk(NUM_CHUNKS):
    """(row, chunk) of this program, int64, on a 1-d grid of rows x ``NUM_CHUNKS`` programs with
    a row's chunks consecutive (they read neighbouring memory)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NUM_CHUNKS
    return row, pid - row * NUM_CHUNKS


def row_block(features: int) -> tuple[int, int]:
    """(BLOCK_F, num_warps) of the row-copy kernels (dispatch, combine): up to 4096 elements per
    program (16 KiB of float32)."""
    block = min(4096, max(16, triton.next_power_of_2(features)))
    return block, 8 if block >= 4096 else 4
