"""Whole-model parity of every usable backend against the reference, with the same weights."""

from __future__ import annotations

import pytest
import torch

import moceir
from moce_kernels._backend import is_available
from tests.conftest import needs_triton_on_cpu

SMALL = dict(num_blocks=(1, 1, 1, 1), num_dec_blocks=(2, 1, 1), num_refinement_blocks=1)


BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(not is_available(b), reason=f"backend {b!r} cannot run here"))
    for b in ("auto", "cpu")
] + [pytest.param("triton", marks=needs_triton_on_cpu)]  # CPU tensors


def run(model, x, train: bool, seed: int = 0):
    model.train(train)
    torch.manual_seed(seed)
    out = model(x)
    loss = out.square().mean() + model.total_loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return out.detach(), model.total_loss.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_backend_matches_reference(backend, train):
    torch.manual_seed(0)
    model = moceir.build_model("moce_ir_s", backend="reference", **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(5, 3, 16, 24)
    ref = run(model, x, train)
    fast = run(model.set_backend(backend), x, train)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-6, rtol=1e-4)
    for (name, p), got, want in zip(model.named_parameters(), fast[2], ref[2], strict=True):
        # An expert no image chose has no gradient (None) or a zero one: the same thing.
        got = torch.zeros_like(p) if got is None else got  # noqa: PLW2901
        want = torch.zeros_like(p) if want is None else want  # noqa: PLW2901
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=name)


def test_set_backend_rejects_unknown_names():
    model = moceir.build_model("moce_ir_s", **SMALL)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("fastest")


def test_is_available_answers_for_known_names_and_rejects_unknown_ones():
    assert is_available("reference") and is_available("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        is_available("fastest")
