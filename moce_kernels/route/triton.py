"""``route`` in Triton: logits -> top-k gates and the whole dispatch plan in ONE launch.

One program walks the batch twice in blocks of ``BLOCK_B`` images (E <= 64 experts, so a block
is a small [BLOCK_B, BLOCK_E] tile in registers):

1. softmax of the clean and the noisy logits, the top-k of the noisy softmax, stores of
   ``gates``, ``experts``, ``probs``, ``noisy_logits``, and running per-expert counts; then
   ``counts`` and ``offsets`` (a prefix sum over the E counts);
2. the same top-k again (recomputed, not re-read: a program re-reading its own global stores
   would need a barrier), and each chosen (image, expert) pair's row in expert order:
   ``offsets[e]`` + rows of expert e in earlier blocks + a prefix sum over the block's images.
   Experts inside one image are distinct, so "earlier slots of expert e" = "earlier images that
   chose e": the order is stable (by image, then choice) by construction.

Nothing is read on the host. A single program is the price of a single launch (no grid-wide
barrier between the counts and the positions); B * k is tiny, so this is fine up to
``MAX_BATCH`` images, above which :func:`route_triton` raises (use the reference there).

Top-k tie rule: among equal probabilities the LOWEST expert index comes first (torch.topk does
not document its order for ties). NaN logits (only reachable with ``check_values=False``) still
give a valid plan (k distinct in-range experts per image; the gates are NaN), never an
out-of-range index.

Autograd (``register_autograd``): the gates, ``probs`` and ``noisy_logits`` are differentiable
w.r.t. the logits, and the gates and ``noisy_logits`` w.r.t. the noise (it is additive), as in
the reference: a drop-in replacement. The backward is one launch over blocks of images (the
softmax Jacobian restricted to the chosen entries, recomputed from ``noisy_logits``). Double
backward is not supported (clear error).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moce_kernels import _library
from moce_kernels.route import _autograd
from moce_kernels.route.reference import RoutingPlan

#: The plan is built by one program: above this many images use backend="reference".
MAX_BATCH = 16384
#: One image's logits live in one register tile.
MAX_EXPERTS = 64


@triton.jit
def _masked_softmax(x, col_ok):
    """Row softmax of a [BLOCK_B, BLOCK_E] float32 tile over the valid columns."""
    x = tl.where(col_ok[None, :], x, float("-inf"))
    row_max = tl.max(x, axis=1)
    num = tl.exp(x - row_max[:, None])
    num = tl.where(col_ok[None, :], num, 0.0)
    return num / tl.sum(num, axis=1)[:, None]


@triton.jit
def _rank_top_k(p, col_ok, K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """[BLOCK_B, BLOCK_E] int32: j where expert e is image b's j-th pick (decreasing p), else -1."""
    cols = tl.arange(0, BLOCK_E)
    choice = tl.full([BLOCK_B, BLOCK_E], -1, tl.int32)
    for j in tl.static_range(K):
        free = (choice < 0) & col_ok[None, :]
        cand = tl.where(free, p, float("-inf"))
        best = tl.max(cand, axis=1)
        # Ties: lowest index. A NaN maximum (NaN logits; x != x is the portable isnan) matches
        # every free column.
        hit = free & ((cand == best[:, None]) | (best != best)[:, None])  # noqa: PLR0124
        pick = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        # If the max reduction dropped NaNs and nothing matched, take the first free column:
        # the plan stays a permutation of in-range experts whatever the values.
        first_free = tl.min(tl.where(free, cols[None, :], BLOCK_E), axis=1)
        pick = tl.where(pick < BLOCK_E, pick, first_free)
        choice = tl.where(cols[None, :] == pick[:, None], j, choice)
    return choice


@triton.jit
def route_fwd_kernel(
    logits_ptr,  # [B, E] any float
    noise_ptr,  # [B, E] any float (unused without HAS_NOISE)
    gates_ptr,  # [B, K] float32
    experts_ptr,  # [B, K] int64
    probs_ptr,  # [B, E] float32
    noisy_ptr,  # [B, E] float32
    counts_ptr,  # [E] int64
    offsets_ptr,  # [E + 1] int64
    sorted_slots_ptr,  # [B * K] int64
    sorted_images_ptr,  # [B * K] int64
    inverse_ptr,  # [B * K] int64
    B,
    E,
    K: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    counts = tl.zeros([BLOCK_E], dtype=tl.int64)

    # Pass 1: softmaxes, top-k, gates/experts/probs/noisy, counts.
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B).to(tl.int64)
        row_ok = rows < B
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * E + cols[None, :]  # [BLOCK_B, BLOCK_E]
        clean = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        noisy = clean
        if HAS_NOISE:
            noisy = clean + tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(probs_ptr + offs, _masked_softmax(clean, col_ok), mask=mask)
        tl.store(noisy_ptr + offs, noisy, mask=mask)
        p = _masked_softmax(noisy, col_ok)
        choice = _rank_top_k(p, col_ok, K, BLOCK_B, BLOCK_E)
        chosen = (choice >= 0) & row_ok[:, None]
        slot = rows[:, None] * K + choice  # [BLOCK_B, BLOCK_E], only read where chosen
        tl.store(gates_ptr + slot, p, mask=chosen)
        expert_ids = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.int64) + cols[None, :]
        tl.store(experts_ptr + slot, expert_ids, mask=chosen)
        counts += tl.sum(chosen.to(tl.int64), axis=0)

    inclusive = tl.cumsum(counts, axis=0)
    tl.store(counts_ptr + cols, counts, mask=col_ok)
    tl.store(offsets_ptr + cols + 1, inclusive, mask=col_ok)
    tl.store(offsets_ptr + cols, tl.zeros([BLOCK_E], dtype=tl.int64), mask=cols == 0)

    # Pass 2: each chosen (image, expert)'s row in expert order. next_row[e] is the row the
    # next slot routed to e will take.
    next_row = inclusive - counts
    num_slots = B * K
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B).to(tl.int64)
        row_ok = rows < B
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * E + cols[None, :]
        noisy = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_NOISE:
            noisy = noisy + tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        choice = _rank_top_k(_masked_softmax(noisy, col_ok), col_ok, K, BLOCK_B, BLOCK_E)
        chosen = ((choice >= 0) & row_ok[:, None]).to(tl.int64)
        # Images of this block before image b that chose e: exclusive prefix sum down the rows.
        before = tl.cumsum(chosen, axis=0) - chosen
        row = next_row[None, :] + before  # [BLOCK_B, BLOCK_E] int64
        next_row += tl.sum(chosen, axis=0)
        slot = rows[:, None] * K + choice
        ok = (chosen > 0) & (row < num_slots)
        tl.store(sorted_slots_ptr + row, slot, mask=ok)
        tl.store(
            sorted_images_ptr + row, tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.int64) + rows[:, None], mask=ok
        )
        tl.store(inverse_ptr + slot, row, mask=ok)


@triton.jit
def route_bwd_kernel(
    noisy_ptr,  # [B, E] float32 (saved forward output)
    probs_ptr,  # [B, E] float32 (saved forward output)
    experts_ptr,  # [B, K] int64
    grad_gates_ptr,  # [B, K] float (unused without HAS_GRAD_GATES)
    grad_probs_ptr,  # [B, E] float (unused without HAS_GRAD_PROBS)
    grad_noisy_ptr,  # [B, E] float (unused without HAS_GRAD_NOISY)
    grad_wrt_noisy_ptr,  # [B, E] float32 out: d loss / d noisy logits (= d loss / d noise)
    grad_wrt_logits_ptr,  # [B, E] float32 out: d loss / d logits
    B,
    E,
    K: tl.constexpr,
    HAS_GRAD_GATES: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr,
    HAS_GRAD_NOISY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < B
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * E + cols[None, :]

    grad_noisy = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.float32)
    if HAS_GRAD_GATES:
        # gates[b, j] = p[b, e_j] with p = softmax(noisy): d/dnoisy_i = sum_j G_j p_e_j (d_ie_j - p_i)
        #           = p_i * (G^_i - sum_e p_e G^_e), G^ = the gate gradients scattered to experts.
        p = _masked_softmax(tl.load(noisy_ptr + offs, mask=mask, other=0.0), col_ok)
        scattered = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.float32)
        for j in tl.static_range(K):
            e_j = tl.load(experts_ptr + rows * K + j, mask=row_ok, other=-1)
            g_j = tl.load(grad_gates_ptr + rows * K + j, mask=row_ok, other=0.0).to(tl.float32)
            scattered += tl.where(cols[None, :] == e_j[:, None], g_j[:, None], 0.0)
        grad_noisy += p * (scattered - tl.sum(p * scattered, axis=1)[:, None])
    if HAS_GRAD_NOISY:
        # noisy_logits = logits + noise: the identity.
        grad_noisy += tl.load(grad_noisy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad_logits = grad_noisy
    if HAS_GRAD_PROBS:
        q = tl.load(probs_ptr + offs, mask=mask, other=0.0)
        grad_q = tl.load(grad_probs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_logits += q * (grad_q - tl.sum(q * grad_q, axis=1)[:, None])
    tl.store(grad_wrt_noisy_ptr + offs, grad_noisy, mask=mask)
    tl.store(grad_wrt_logits_ptr + offs, grad_logits, mask=mask)


# --- launchers ------------------------------------------------------------------------------


def _blocks(num_experts: int) -> tuple[int, int]:
    block_e = max(2, triton.next_power_of_2(num_experts))
    return max(16, 2048 // block_e), block_e


def route_fwd(logits: torch.Tensor, noise: torch.Tensor | None, k: int) -> tuple[torch.Tensor, ...]:
    """The nine plan tensors (RoutingPlan order) of contiguous [B, E] logits (and noise)."""
    batch, num_experts = logits.shape
    dev = logits.device
    gates = torch.empty(batch, k, dtype=torch.float32, device=dev)
    experts = torch.empty(batch, k, dtype=torch.int64, device=dev)
    probs = torch.empty(batch, num_experts, dtype=torch.float32, device=dev)
    noisy = torch.empty(batch, num_experts, dtype=torch.float32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int64, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
    sorted_slots = torch.empty(batch * k, dtype=torch.int64, device=dev)
    sorted_images = torch.empty(batch * k, dtype=torch.int64, device=dev)
    inverse = torch.empty(batch * k, dtype=torch.int64, device=dev)
    if batch == 0:
        # Nothing to route (and no kernel launch on zero-size buffers).
        counts.zero_()
        offsets.zero_()
    else:
        block_b, block_e = _blocks(num_experts)
        route_fwd_kernel[(1,)](
            logits,
            logits if noise is None else noise,
            gates,
            experts,
            probs,
            noisy,
            counts,
            offsets,
            sorted_slots,
            sorted_images,
            inverse,
            batch,
            num_experts,
            K=k,
            HAS_NOISE=noise is not None,
            BLOCK_B=block_b,
            BLOCK_E=block_e,
            num_warps=4,
        )
    return gates, experts, probs, noisy, counts, offsets, sorted_slots, sorted_images, inverse


def route_bwd(
    noisy: torch.Tensor,
    probs: torch.Tensor,
    experts: torch.Tensor,
    grad_gates: torch.Tensor | None,
    grad_probs: torch.Tensor | None,
    grad_noisy: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d noisy logits, d loss / d logits), both [B, E] float32; the gradients are copied
    to contiguous first when they are not."""
    grad_gates, grad_probs, grad_noisy = (
        None if t is None else t.contiguous() for t in (grad_gates, grad_probs, grad_noisy)
    )
    batch, num_experts = noisy.shape
    grad_wrt_noisy = torch.empty_like(noisy)
    grad_wrt_logits = torch.empty_like(noisy)
    if batch == 0:
        return grad_wrt_noisy, grad_wrt_logits
    block_b, block_e = _blocks(num_experts)
    route_bwd_kernel[(triton.cdiv(batch, block_b),)](
        noisy,
        probs,
        experts,
        noisy if grad_gates is None else grad_gates,
        noisy if grad_probs is None else grad_probs,
        noisy if grad_noisy is None else grad_noisy,
        grad_wrt_noisy,
        grad_wrt_logits,
        batch,
        num_experts,
        K=experts.shape[1],
        HAS_GRAD_GATES=grad_gates is not None,
        HAS_GRAD_PROBS=grad_probs is not None,
        HAS_GRAD_NOISY=grad_noisy is not None,
        BLOCK_B=block_b,
        BLOCK_E=block_e,
        num_warps=4,
    )
    return grad_wrt_noisy, grad_wrt_logits


# --- torch.library registration --------------------------------------------------------------
# custom_op + register_fake rather than triton_op: see moce_kernels/_library.py.


def _route_fwd_impl(
    logits: torch.Tensor, noise: torch.Tensor | None, k: int
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    return route_fwd(logits.contiguous(), None if noise is None else noise.contiguous(), k)


def _route_fwd_fake(logits, noise, k):
    batch, num_experts = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    i64 = dict(dtype=torch.int64, device=logits.device)
    return (
        torch.empty(batch, k, **f32),
        torch.empty(batch, k, **i64),
        torch.empty(batch, num_experts, **f32),
        torch.empty(batch, num_experts, **f32),
        torch.empty(num_experts, **i64),
        torch.empty(num_experts + 1, **i64),
        torch.empty(batch * k, **i64),
        torch.empty(batch * k, **i64),
        torch.empty(batch * k, **i64),
    )


def _route_bwd_fake(noisy, probs, experts, grad_gates, grad_probs, grad_noisy):
    return torch.empty_like(noisy), torch.empty_like(noisy)


_route_fwd_op = _library.define_triton(
    "route", _route_fwd_impl, route_bwd, _route_fwd_fake, _route_bwd_fake, _autograd
)


def route_triton(logits: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> RoutingPlan:
    """:func:`moce_kernels.route` with the Triton kernels (``backend="triton"``).

    Arguments as ``route`` (which validates them first): logits [B, E] of any float dtype, k in
    1..E, optional noise [B, E]. Returns a :class:`RoutingPlan` on the logits' device, built by
    one kernel launch without host reads; gates, probs and noisy_logits carry autograd history
    like the reference's. Top-k ties go to the lowest expert index.

    Raises:
        ValueError: more than ``MAX_BATCH`` images or ``MAX_EXPERTS`` experts (use the reference).
    """
    batch, num_experts = logits.shape
    if batch > MAX_BATCH:
        raise ValueError(
            f"route (triton): builds the plan in one program, up to {MAX_BATCH} images; got {batch}. "
            "Use backend='reference' for larger batches."
        )
    if num_experts > MAX_EXPERTS:
        raise ValueError(
            f"route (triton): at most {MAX_EXPERTS} experts, got {num_experts}. Use backend='reference'."
        )
    return RoutingPlan(*_route_fwd_op(logits, noise, k))
