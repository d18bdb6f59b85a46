"""What forwards reuse instead of remaking at every call.

Eval under autocast: the trunk's convolutions cast their parameters to the autocast dtype once
and reuse the casts between forwards (``moceir.layers.packing_cache``) while the parameters are
unchanged; with gradients on they cast at every call, inside the autograd graph. And the
convolutions' one-group offsets, kept per batch size (not while compiling or capturing)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moceir
from moce_kernels._backend import is_available
from moceir.layers import conv as conv_module
from moceir.layers.conv import DepthwiseConv2d, PointwiseConv2d
from moceir.layers.packing_cache import CACHE_ATTRIBUTES
from tests.conftest import needs_triton_on_cpu
from tests.model.conftest import perturbed_model

SMALL = dict(num_blocks=(1, 1, 1, 1), num_dec_blocks=(1, 1, 1), num_refinement_blocks=1)
BACKENDS = [pytest.param("triton", marks=needs_triton_on_cpu)]
CPU = pytest.param("cpu", marks=pytest.mark.skipif(not is_available("cpu"), reason="C++ kernels not built"))


class _CastCounter(TorchDispatchMode):
    """Counts ``_to_copy`` calls whose input is one of ``watched`` (by storage address)."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched = watched
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_to_copy" and args[0].data_ptr() in self.watched:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def _model(backend: str) -> moceir.MoCEIR:
    return perturbed_model(backend, **SMALL).eval()


def _conv_parameters(model: moceir.MoCEIR) -> set[int]:
    return {
        p.data_ptr()
        for m in model.modules()
        if isinstance(m, (PointwiseConv2d, DepthwiseConv2d))
        for p in m.parameters(recurse=False)
    }


def _caches(model: moceir.MoCEIR) -> int:
    return sum(len(m.__dict__.get(name) or ()) for m in model.modules() for name in CACHE_ATTRIBUTES)


def _infer(model: moceir.MoCEIR, x: torch.Tensor, counter: _CastCounter | None = None) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        if counter is None:
            return model(x)
        with counter:
            return model(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_casts_the_parameters_once(backend):
    model = _model(backend)
    x = torch.rand(1, 3, 16, 16)
    first = _CastCounter(_conv_parameters(model))
    want = _infer(model, x, first)
    assert first.casts > 50  # the trunk's convolutions cast their weights and biases
    second = _CastCounter(_conv_parameters(model))
    got = _infer(model, x, second)
    assert second.casts == 0
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # The same bits as a forward that casts as it goes (gradients on: nothing is kept).
    with torch.autocast("cpu", torch.bfloat16):
        torch.testing.assert_close(model(x).detach(), want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_or_replaced_parameters_are_cast_again(backend):
    model = _model(backend)
    x = torch.rand(1, 3, 16, 16)
    before = _infer(model, x)
    convs = [m for m in model.modules() if isinstance(m, PointwiseConv2d)]
    conv = convs[len(convs) // 2]
    with torch.no_grad():
        conv.weight.mul_(1.5)  # in place: a new version
    changed = _infer(model, x)
    assert not torch.equal(changed, before)
    fresh = _model(backend)
    with torch.no_grad():
        dict(fresh.named_modules())[_name_of(model, conv)].weight.mul_(1.5)
    torch.testing.assert_close(changed, _infer(fresh, x), atol=0, rtol=0)
    # Replaced by new tensors (assign=True): the casts of the old ones are not used.
    state = {k: v * 0.5 if v.is_floating_point() else v for k, v in _model(backend).state_dict().items()}
    model.load_state_dict(state, assign=True)
    fresh.load_state_dict(state)
    torch.testing.assert_close(_infer(model, x), _infer(fresh, x), atol=0, rtol=0)


def _name_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_keeps_no_casts_and_moving_the_model_drops_them(backend):
    model = _model(backend).train()
    x = torch.rand(1, 3, 16, 16)
    with torch.autocast("cpu", torch.bfloat16):
        model(x).float().mean().backward()
    assert _caches(model) == 0, "a forward with gradients must not cache"
    assert all(
        p.grad is not None for m in model.modules() if isinstance(m, DepthwiseConv2d) for p in m.parameters()
    )
    _infer(model.eval(), x)
    assert _caches(model) > 0
    model.to(torch.float32)  # a no-op conversion still goes through _apply
    assert _caches(model) == 0


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "conv", [DepthwiseConv2d(8, 3, bias=True), PointwiseConv2d(8, 16)], ids=lambda c: type(c).__name__
)
def test_the_reference_backend_runs_exactly_nn_conv2d(conv):
    # Under autocast too: no cast of ours ahead of nn.Conv2d's own (the reference's cost).
    conv.backend = "reference"
    plain = torch.nn.Conv2d(8, conv.out_channels, conv.kernel_size, padding=conv.padding, groups=conv.groups)
    plain.load_state_dict(conv.state_dict())
    x = torch.rand(2, 8, 5, 6)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16):
            with _OpCounter() as ours:
                got = conv(x)
            with _OpCounter() as theirs:
                want = plain(x)
        assert ours.ops == theirs.ops
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_one_group_offsets_are_kept_per_batch_size():
    x = torch.empty(5, 2, 3, 3)
    first = conv_module._one_group(x)
    assert first.tolist() == [0, 5]
    assert conv_module._one_group(x) is first
    assert conv_module._one_group(torch.empty(7, 2, 3, 3)).tolist() == [0, 7]
    with torch.inference_mode():
        made_in_inference = conv_module._one_group(torch.empty(9, 2, 3, 3))
    assert not made_in_inference.is_inference()  # a later training step may save it for backward


@pytest.mark.parametrize("backend", [CPU])
def test_training_after_inference_mode_uses_the_kept_offsets(backend):
    model = _model(backend)
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).mean().backward()  # the offsets made under inference_mode are saved for backward
    assert all(
        p.grad is not None for m in model.modules() if isinstance(m, DepthwiseConv2d) for p in m.parameters()
    )


def test_compiling_or_capturing_makes_fresh_offsets(monkeypatch):
    x = torch.empty(3, 2, 3, 3)
    kept = conv_module._one_group(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fresh = conv_module._one_group(x)
    assert fresh is not kept and fresh.tolist() == [0, 3]


@pytest.mark.parametrize("backend", [*BACKENDS, CPU])
def test_casts_kept_under_inference_mode_serve_no_grad_and_leave_training_alone(backend):
    model = _model(backend)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        first = model(x)
    no_grad = _infer(model, x)  # served the casts made under inference_mode
    with torch.autocast("cpu", torch.bfloat16):
        trained = model(x)
        trained.float().mean().backward()
    torch.testing.assert_close(no_grad, first, atol=0, rtol=0)
    torch.testing.assert_close(trained.detach(), first, atol=0, rtol=0)


@pytest.mark.parametrize("backend", [CPU])
def test_a_model_with_kept_casts_pickles_and_copies_without_them(backend, tmp_path):
    model = _model(backend).set_expert_path("sync_free")
    x = torch.rand(1, 3, 16, 16)
    want = _infer(model, x)
    assert _caches(model) > 0
    torch.save(model, tmp_path / "model.pt")  # the whole module, caches and all
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    copied = copy.deepcopy(model)
    assert _caches(loaded) == 0 and _caches(copied) == 0
    torch.testing.assert_close(_infer(loaded, x), want, atol=0, rtol=0)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
    assert not torch.equal(_infer(copied, x), want)
    torch.testing.assert_close(_infer(model, x), want, atol=0, rtol=0)  # the original is untouched
