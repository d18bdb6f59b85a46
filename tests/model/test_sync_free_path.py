"""The sync-free expert path (``expert_path="sync_free"``) against the per-expert path, with the
same weights and routing: outputs, the aux loss and every parameter gradient, per backend."""

from __future__ import annotations

import pytest
import torch

import moceir
from moce_kernels._backend import is_available
from moceir.layers import grouped_experts
from moceir.layers.packing_cache import cached_value
from tests.conftest import needs_triton_on_cpu
from tests.model.conftest import perturbed_model

SMALL = dict(num_blocks=(1, 1, 1, 1), num_dec_blocks=(2, 1, 1), num_refinement_blocks=1)

BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(not is_available(b), reason=f"backend {b!r} cannot run here"))
    for b in ("reference", "cpu")
]


def _model(**overrides) -> moceir.MoCEIR:
    return perturbed_model(**{**SMALL, **overrides})


def _run(model, x, path: str, train: bool):
    model.set_expert_path(path).train(train)
    torch.manual_seed(1)  # the same routing noise on both paths
    out = model(x)
    loss = out.square().mean() + model.total_loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return out.detach(), model.total_loss.detach(), grads


def _assert_same(model, got, want, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], want[1], atol=1e-7, rtol=1e-5)
    for (name, p), g, w in zip(model.named_parameters(), got[2], want[2], strict=True):
        # Experts no image chose: no gradient on the per-expert path, zeros on the sync-free one.
        assert g is not None, f"{name}: the sync-free path gives every parameter a gradient"
        w = torch.zeros_like(p) if w is None else w  # noqa: PLW2901
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    ("batch", "top_k", "size"),
    [pytest.param(5, 2, (16, 24), id="B5-k2"), pytest.param(1, 1, (13, 21), id="B1-k1-odd")],
)
def test_sync_free_path_matches_per_expert_path(backend, train, batch, top_k, size):
    model = _model(top_k=top_k).set_backend(backend)
    x = torch.rand(batch, 3, *size)
    want = _run(model, x, "per_expert", train)
    got = _run(model, x, "sync_free", train)
    _assert_same(model, got, want)


@needs_triton_on_cpu
def test_sync_free_path_on_triton_matches_per_expert_path():
    """The Triton kernels (the interpreter on the CPU): grouped_pointwise's grouped GEMM and
    grouped_dwconv, one training step (the interpreter is slow: one case)."""
    model = _model(top_k=2).set_backend("triton")
    x = torch.rand(5, 3, 16, 24)
    _assert_same(model, _run(model, x, "sync_free", True), _run(model, x, "per_expert", True))


def test_sync_free_path_chains_experts_at_depth_2():
    model = _model(expert_depth=2)
    x = torch.rand(3, 3, 16, 16)
    _assert_same(model, _run(model, x, "sync_free", True), _run(model, x, "per_expert", True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_free_path_under_bf16_autocast_matches_per_expert_path(backend):
    model = _model().set_backend(backend).eval()
    x = torch.rand(2, 3, 16, 16)
    outs = []
    for path in ("per_expert", "sync_free"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model.set_expert_path(path)(x).float())
    # Both run the experts' convolutions in bf16 (as autocast runs nn.Conv2d), in other orders.
    torch.testing.assert_close(outs[1], outs[0], atol=3e-2, rtol=3e-2)


def test_auto_takes_the_per_expert_path_in_eager_mode(monkeypatch):
    """ "auto" runs the least work in eager mode: the sync-free path only while compiling or
    capturing a CUDA graph (that case is covered by tests/model/test_compile.py)."""
    calls = []
    original = grouped_experts.run_experts_grouped
    monkeypatch.setattr(
        "moceir.layers.adapter.run_experts_grouped", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model = _model().set_backend("cpu" if is_available("cpu") else "reference").eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
        assert not calls
        model.set_expert_path("sync_free")(torch.rand(2, 3, 16, 16))
    assert len(calls) == len(model.adapters())


def test_set_expert_path_rejects_unknown_names():
    model = _model()
    with pytest.raises(ValueError, match="expert path must be one of"):
        model.set_expert_path("fastest")
    model.adapters()[0].expert_path = "fastest"
    with pytest.raises(ValueError, match="expert_path must be one of"):
        model(torch.rand(1, 3, 8, 8))


def test_eval_reuses_packed_parameters_until_a_weight_changes():
    model = _model().eval().set_expert_path("sync_free")
    adapter = model.adapters()[0]
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        first = model(x)
        packed = cached_value(adapter._packed, "sync_free")
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
        assert cached_value(adapter._packed, "sync_free") is packed, "a second eval forward packed again"
        for ex in adapter.experts:
            ex[0].proj[2].weight.mul_(2)  # in place: the cache must notice
        changed = model(x)
    assert cached_value(adapter._packed, "sync_free") is not packed
    torch.testing.assert_close(changed, model.set_expert_path("per_expert")(x).detach(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(changed, first)


def test_per_expert_path_reuses_its_packed_depthwise_weights_in_eval():
    model = _model().eval().set_expert_path("per_expert")
    adapter = model.adapters()[0]
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        first = model(x)
        packed = {name: cached_value(adapter._packed, name) for name in ("q_dwconv", "kv_dwconv")}
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
        assert all(cached_value(adapter._packed, name) is p for name, p in packed.items()), "packed again"
        for ex in adapter.experts:
            ex[0].body.kv_dwconv.weight.mul_(2)  # in place: the cache must notice
        changed = model(x)
        assert cached_value(adapter._packed, "q_dwconv") is packed["q_dwconv"]
        assert cached_value(adapter._packed, "kv_dwconv") is not packed["kv_dwconv"]
        for a in model.adapters():
            a._packed.clear()
        fresh = model(x)  # everything packed anew
    torch.testing.assert_close(changed, fresh, atol=0, rtol=0)
    assert not torch.allclose(changed, first)


def test_training_forward_packs_inside_the_autograd_graph():
    model = _model().train().set_expert_path("sync_free")
    model(torch.rand(2, 3, 16, 16))
    assert not model.adapters()[0]._packed, "a forward with gradients must not cache"
