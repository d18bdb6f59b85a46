"""A 1x1 convolution then a depthwise k x k one as one dense convolution
(``moceir.layers.composed_conv``): the same function as the two layers, forward and every
gradient, with and without either bias (the 1x1 bias corrected at the border), at image sizes
down to 1 x 1, in float64, float32, a bfloat16 model and bf16 autocast; and the attention
layers' use of it, which only benchmark mode on a GPU chooses (the timing itself is in
tests/model/test_tuning_gpu.py)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import moceir
from moceir.layers import composed_conv, tuning
from moceir.layers.attention import Attention, CrossAttention
from moceir.layers.composed_conv import composed_conv as compose
from moceir.layers.conv import DepthwiseConv2d, PointwiseConv2d
from moceir.layers.norm import LayerNorm2d

SIZES = [(1, 1), (1, 6), (2, 3), (3, 3), (4, 5), (7, 2), (9, 11)]


def layers(c_in: int, c_out: int, k: int, pw_bias: bool, dw_bias: bool, dtype=torch.float64):
    torch.manual_seed(0)
    pw = PointwiseConv2d(c_in, c_out, bias=pw_bias)
    dw = DepthwiseConv2d(c_out, k, dw_bias)
    with torch.no_grad():
        for p in [*pw.parameters(), *dw.parameters()]:
            p.copy_(torch.randn_like(p))  # biases of the weights' size: the border matters
    return pw.to(dtype), dw.to(dtype)


def value_and_grads(fn, x, params):
    y = fn(x)
    grads = torch.autograd.grad(
        y, [x, *params], torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    )
    return y, grads


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("pw_bias, dw_bias", [(True, True), (True, False), (False, True), (False, False)])
def test_composed_is_the_two_layers_float64(size, k, pw_bias, dw_bias):
    pw, dw = layers(5, 6, k, pw_bias, dw_bias)
    x = torch.randn(2, 5, *size, dtype=torch.float64, requires_grad=True)
    params = [*pw.parameters(), *dw.parameters()]
    want = value_and_grads(lambda t: dw(pw(t)), x, params)
    got = value_and_grads(lambda t: compose(t, pw, dw), x, params)
    torch.testing.assert_close(got[0], want[0], atol=1e-11, rtol=1e-11)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_composed_float32_and_its_border_rows_and_columns_only():
    pw, dw = layers(16, 24, 3, True, True, torch.float32)
    x = torch.randn(3, 16, 20, 17)
    want = dw(pw(x))
    got = compose(x, pw, dw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # Without the correction only the border differs (the interior's bias is exact).
    weight, bias = composed_conv.composed_weights(pw, dw)
    raw = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(raw[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=2e-5, rtol=1e-5)
    assert (raw[..., 0, :] - want[..., 0, :]).abs().min() > 1e-3


@pytest.mark.parametrize(
    "dtype, autocast", [(torch.float32, True), (torch.bfloat16, False)], ids=["autocast", "model"]
)
def test_composed_in_bf16(dtype, autocast):
    """bf16 autocast, and a model cast to bf16: the composed weights' rounding costs no more than
    the two layers' (the 1x1 convolution's output), both against the float64 function of the
    same (rounded) parameters."""
    pw, dw = layers(8, 24, 3, True, True, dtype)
    x = torch.randn(2, 8, 9, 10).to(dtype)
    truth = copy.deepcopy(dw).double()(copy.deepcopy(pw).double()(x.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        composed, separate = compose(x, pw, dw), dw(pw(x))
    assert composed.dtype == separate.dtype == torch.bfloat16
    scale = truth.abs().max()
    err_composed, err_separate = ((y.double() - truth).abs().max() / scale for y in (composed, separate))
    assert err_composed < 2e-2 and err_composed <= 2 * err_separate + 1e-3, (err_composed, err_separate)


def test_composed_compiles_to_one_graph():
    pw, dw = layers(4, 12, 3, True, True, torch.float32)
    x = torch.randn(2, 4, 6, 5)
    compiled = torch.compile(lambda t: compose(t, pw, dw), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), compose(x, pw, dw))


@pytest.fixture
def force_composed(monkeypatch):
    """The attention layers' choice forced to the composed convolution (on the CPU: the choice
    is otherwise made by timing on a GPU only); records the kinds asked for."""
    kinds = []

    def choose(key, candidates, default, x):
        kinds.append(key[0])
        assert set(candidates) == {"separate", "composed"} and default == "separate"
        return "composed"

    monkeypatch.setattr(composed_conv, "_may_compose", lambda *args: True)
    monkeypatch.setattr(tuning, "choose", choose)
    return kinds


def _perturbed(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module.double()


def test_attention_layers_use_it_where_chosen(force_composed, monkeypatch):
    attn, cross, norm = (
        _perturbed(Attention(8, 2, True)),
        _perturbed(CrossAttention(8, 2, True)),
        _perturbed(LayerNorm2d(8)),
    )
    x, y = torch.randn(2, 8, 5, 7, dtype=torch.float64), torch.randn(2, 8, 5, 7, dtype=torch.float64)
    got = attn(x, norm=norm), cross(x, y)
    assert force_composed == ["pointwise-depthwise-norm", "pointwise-depthwise"]
    monkeypatch.setattr(composed_conv, "_may_compose", lambda *args: False)
    want = attn(x, norm=norm), cross(x, y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-11)


def test_never_chosen_outside_benchmark_mode_on_a_gpu(monkeypatch):
    """On the CPU (and with benchmark mode off anywhere) the two layers run as they are, bit for
    bit, and nothing is timed or chosen."""
    monkeypatch.setattr(tuning, "choose", lambda *a: pytest.fail("asked for a choice"))
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        attn = Attention(8, 2, True)
        x = torch.randn(1, 8, 16, 16)  # enough pixels per channel: only the device says no
        q, k, v = attn.qkv_dwconv(attn.qkv(x)).chunk(3, dim=1)
        assert not composed_conv._may_compose(x, attn.qkv, attn.qkv_dwconv)
        torch.testing.assert_close(
            composed_conv.pointwise_then_depthwise(x, attn.qkv, attn.qkv_dwconv),
            torch.cat([q, k, v], 1),
            rtol=0,
            atol=0,
        )
    finally:
        torch.backends.cudnn.benchmark = saved


def test_whole_model_with_every_pair_composed(force_composed, monkeypatch):
    """Every encoder, decoder and refinement block's pairs composed: the model's function and
    every parameter's gradient (float64, training mode, the routing noise seeded)."""
    torch.manual_seed(0)
    small = dict(num_blocks=(1, 1, 1, 1), num_dec_blocks=(1, 1, 1), num_refinement_blocks=1)
    model = moceir.build_model("moce_ir_s", backend="reference", **small).double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(2, 3, 12, 10, dtype=torch.float64)

    def run():
        torch.manual_seed(3)
        out = model(x)
        return out, torch.autograd.grad(out.square().mean(), list(model.parameters()), allow_unused=True)

    got = run()
    assert "pointwise-depthwise-norm" in force_composed and "pointwise-depthwise" in force_composed
    monkeypatch.setattr(composed_conv, "_may_compose", lambda *args: False)
    want = run()
    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=1e-10)
    for (name, _), g, w in zip(model.named_parameters(), got[1], want[1], strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=name)


def test_always_composed_composes_anywhere_and_restores(monkeypatch):
    calls = []
    real = composed_conv.composed_conv
    monkeypatch.setattr(composed_conv, "composed_conv", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(tuning, "choose", lambda *a: pytest.fail("asked for a choice"))
    attn = _perturbed(Attention(8, 2, True))
    x = torch.randn(1, 8, 3, 5, dtype=torch.float64)
    want = attn(x)
    with composed_conv.always_composed():
        got = attn(x)
    assert calls == [1]
    attn(x)
    assert calls == [1]  # off again
    torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


def test_always_composed_holds_for_its_own_thread_only(monkeypatch):
    calls = []
    real = composed_conv.composed_conv
    monkeypatch.setattr(composed_conv, "composed_conv", lambda *a: calls.append(1) or real(*a))
    attn = _perturbed(Attention(8, 2, True))
    x = torch.randn(1, 8, 3, 5, dtype=torch.float64)
    done = {}
    with composed_conv.always_composed():
        other = threading.Thread(target=lambda: done.setdefault("y", attn(x)))
        other.start()
        other.join()
        assert "y" in done and calls == []  # another thread ran the layers as they are
        attn(x)
    assert calls == [1]


@pytest.mark.parametrize(
    "shape, offered",
    [((1, 32, 4, 4), False), ((2, 32, 16, 16), True), ((1, 256, 8, 8), False), ((16, 256, 32, 32), True)],
)
def test_offered_only_with_enough_pixels_per_channel(shape, offered):
    """Benchmark mode times the composition only where its weight (k^2 C_out C_in values, made at
    every forward) is small against the activations it saves."""
    assert composed_conv._enough_pixels(torch.empty(shape, device="meta")) == offered


def test_mismatched_layers_are_refused_by_name():
    pw, dw = layers(4, 6, 3, True, True, torch.float32)
    _, wrong = layers(4, 5, 3, True, True, torch.float32)
    with pytest.raises(ValueError, match=r"depthwise convolution over pointwise's 6 output channels"):
        compose(torch.randn(1, 4, 5, 5), pw, wrong)
    with pytest.raises(RuntimeError, match="channels"):  # x of the wrong width: F.conv2d's own error
        compose(torch.randn(1, 3, 5, 5), pw, dw)


def test_eval_keeps_the_composed_weights_until_a_parameter_changes(monkeypatch):
    made = []
    real = composed_conv.composed_weights
    monkeypatch.setattr(composed_conv, "composed_weights", lambda *a: made.append(1) or real(*a))
    attn = _perturbed(Attention(8, 2, True)).float()  # autocast casts float32, not float64
    x = torch.randn(2, 8, 6, 5)
    with composed_conv.always_composed():
        with torch.autocast("cpu", torch.bfloat16):
            trained = attn(x)  # gradients on: made at every call
            attn(x)
        assert len(made) == 2
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            first, second = attn(x), attn(x)
        assert len(made) == 3  # the second eval forward reused the first's
        torch.testing.assert_close(first, trained.detach(), atol=0, rtol=0)
        torch.testing.assert_close(second, first, atol=0, rtol=0)
        with torch.no_grad():
            attn.qkv_dwconv.weight.mul_(2)  # in place: made again
            changed = attn(x)
            assert len(made) == 4
            attn.qkv.eval_cache().clear()
            torch.testing.assert_close(changed, attn(x), atol=0, rtol=0)
