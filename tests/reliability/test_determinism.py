"""Bitwise determinism of a full training step, and no memory growth over repeated steps."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import moceir

SMALL = dict(num_blocks=(1, 1, 1, 1), num_dec_blocks=(2, 1, 1), num_refinement_blocks=1)


def train_step(backend: str, seed: int = 0, expert_path: str = "auto"):
    torch.manual_seed(seed)
    model = moceir.build_model("moce_ir_s", backend=backend, **SMALL).train()
    model.set_expert_path(expert_path)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    x = torch.rand(3, 3, 24, 16)
    target = torch.rand(3, 3, 24, 16)
    out = model(x)
    loss = (out - target).abs().mean() + 0.01 * model.total_loss
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    opt.step()
    return out.detach(), loss.detach(), grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("backend", "expert_path"), [("reference", "auto"), ("auto", "per_expert"), ("auto", "sync_free")]
)
def test_training_step_is_bitwise_reproducible(backend, expert_path):
    first, second = train_step(backend, expert_path=expert_path), train_step(backend, expert_path=expert_path)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(first[3], second[3], strict=True):
        assert torch.equal(a, b)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
def test_repeated_forward_backward_does_not_grow_memory():
    torch.manual_seed(0)
    model = moceir.build_model("moce_ir_s", **SMALL).train()
    x = torch.rand(2, 3, 32, 32)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out.mean() + model.total_loss).backward()

    for _ in range(3):  # warm-up: allocator pools, lazy initialisation
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(15):
        step()
    gc.collect()
    growth = _rss_bytes() - before
    # One step of this model allocates tens of MB; a leak of one step's activations per
    # iteration would exceed this bound many times over.
    assert growth < 64 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 15 steps"
