"""The trunk's LayerNorm -> 1x1 and 1x1 -> residual add on ``fused_pointwise``
(``PointwiseConv2d.fused``), and the GDFN's tail on ``dwconv_gate_pointwise``: with backend
"triton" (the interpreter here) every block's LayerNorm and skip go into its 1x1 convolutions
(the FFN's skip into its fused tail), with the reference's function, forward and every
gradient, also under bf16 autocast; the reference backend and the backends without a kernel of the fusion
run the unfused layers bit for bit. Benchmark mode's choice between the two is GPU-only
(tests/model/test_tuning_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moceir
from moceir.layers import attention, conv, norm
from moceir.layers.blocks import DecoderBlock, EncoderBlock
from tests.conftest import needs_triton_on_cpu

#: These tests run the Triton kernels on CPU tensors. The GPU side is in test_backends_gpu.py
#: and test_tuning_gpu.py.
needs_triton = needs_triton_on_cpu

SMALL = dict(num_blocks=(1, 1, 1, 1), num_dec_blocks=(2, 1, 1), num_refinement_blocks=1)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the trunk's fused_pointwise calls (with a norm, with a residual), of its
    unfused LayerNorm calls and of the GDFN tails fused with their skip (``dwconv_gate_pointwise``)."""
    counts = {"norm": 0, "residual": 0, "attention": 0, "layernorm": 0, "tail": 0}
    fused, layernorm, tail = conv.fused_pointwise, norm.layernorm2d, attention.dwconv_gate_pointwise

    def counting_fused(*args, **kwargs):
        counts["attention"] += args[1].dim() == 3  # a per-image weight: W @ blockdiag(attn)
        counts["norm"] += kwargs.get("norm_weight") is not None
        counts["residual"] += kwargs.get("residual") is not None
        return fused(*args, **kwargs)

    def counting_layernorm(*args, **kwargs):
        counts["layernorm"] += 1
        return layernorm(*args, **kwargs)

    def counting_tail(*args, **kwargs):
        counts["tail"] += kwargs.get("residual") is not None
        return tail(*args, **kwargs)

    monkeypatch.setattr(conv, "fused_pointwise", counting_fused)
    monkeypatch.setattr(norm, "layernorm2d", counting_layernorm)
    monkeypatch.setattr(attention, "dwconv_gate_pointwise", counting_tail)
    return counts


@pytest.fixture
def fold_always(monkeypatch):
    """Attention maps folded into project_out at any image size (the small test images have
    fewer pixels per channel than the default threshold)."""
    monkeypatch.setattr(conv, "FOLD_MIN_PIXELS_PER_CHANNEL", 0)


def perturbed_model() -> moceir.MoCEIR:
    torch.manual_seed(0)
    model = moceir.build_model("moce_ir_s", backend="reference", **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def blocks(model: moceir.MoCEIR) -> tuple[int, int]:
    modules = list(model.modules())
    encoders = sum(isinstance(m, EncoderBlock) for m in modules)
    return encoders, sum(isinstance(m, DecoderBlock) for m in modules)


def forward_backward(model: moceir.MoCEIR, x: torch.Tensor):
    model.eval()
    out = model(x)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()), allow_unused=True)
    return out.detach(), grads


@needs_triton
def test_triton_fuses_every_trunk_layernorm_and_skip(calls, fold_always):
    model = perturbed_model().set_backend("triton")
    encoder_blocks, decoder_blocks = blocks(model)
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 16, 16))
    # Encoder block: qkv and project_in normalise, attention's project_out adds the skip and
    # reads attn @ v through its folded weight, the FFN's tail (depthwise conv -> gate ->
    # project_out) adds its skip. Decoder block: its two projections and project_in normalise,
    # cross-attention's project_out and the FFN's tail add the skip, both attentions' fold.
    assert calls == {
        "norm": 2 * encoder_blocks + 3 * decoder_blocks,
        "residual": encoder_blocks + decoder_blocks,
        "attention": encoder_blocks + 2 * decoder_blocks,
        "layernorm": 0,
        "tail": encoder_blocks + decoder_blocks,
    }


@needs_triton
def test_triton_matches_reference_with_gradients(fold_always):
    model = perturbed_model()
    x = torch.rand(2, 3, 16, 24)
    want, want_grads = forward_backward(model, x)
    got, got_grads = forward_backward(model.set_backend("triton"), x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (name, p), g, w in zip(model.named_parameters(), got_grads, want_grads, strict=True):
        g = torch.zeros_like(p) if g is None else g  # noqa: PLW2901
        w = torch.zeros_like(p) if w is None else w  # noqa: PLW2901
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3, msg=name)


@needs_triton
def test_triton_block_under_bf16_autocast(fold_always):
    """An encoder block on bf16 activations under autocast: the fused kernels make the unfused
    layers' roundings, a few bf16 ulps apart. (The whole model's bf16 parity runs on the GPU,
    tests/model/test_backends_gpu.py: Triton 3.8's interpreter truncates float32 -> bfloat16
    casts, where a GPU rounds to nearest, so here every bf16 store is up to an ulp low, and the
    fusion moves the residual sums from torch's rounding adds into such stores.)"""
    model = perturbed_model()
    block = next(m for m in model.modules() if isinstance(m, EncoderBlock)).eval()
    x = torch.randn(2, block.norms[0].body.weight.shape[0], 8, 8).bfloat16()
    results = []
    for backend in ("reference", "triton"):
        for m in block.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        grads = torch.autograd.grad(out.float().square().mean(), list(block.parameters()))
        results.append((out.float(), grads))
    (want, want_grads), (got, got_grads) = results
    scale = want.abs().max().item()
    # 2 ulps of the largest value (2 * 2^-8 relative), within which the truncation's drift stays.
    assert (got - want).abs().max().item() <= 2 * 2**-8 * scale
    # Gradients against the block's largest: the temperatures' are sums that cancel to ~1e-4 of
    # it, where bf16 roundings of their terms move them by a few percent of themselves.
    g_scale = max(w.abs().max().item() for w in want_grads)
    for (name, p), g, w in zip(block.named_parameters(), got_grads, want_grads, strict=True):
        assert g.dtype == p.dtype == torch.float32, name
        torch.testing.assert_close(g / g_scale, w / g_scale, atol=2e-2, rtol=0, msg=name)


def test_reference_backend_is_the_unfused_block_code(calls):
    """The blocks' unfused path is ``x + branch(norm(x))`` as before, to the bit."""
    model = perturbed_model()
    block = next(m for m in model.modules() if isinstance(m, EncoderBlock))
    x = torch.randn(2, block.norms[0].body.weight.shape[0], 5, 7)
    y = x + block.mixer(block.norms[0](x))
    want = y + block.ffn(block.norms[1](y))
    calls["layernorm"] = 0
    assert torch.equal(block(x), want)
    assert calls == {"norm": 0, "residual": 0, "attention": 0, "layernorm": 2, "tail": 0}


@pytest.mark.parametrize("backend", ["auto", "cpu", "cuda"])
def test_backends_without_a_kernel_of_the_fusion_run_unfused(backend):
    """On the CPU "auto" resolves to the reference of the fusion (no C++ kernel of it), and a
    model on "cpu" / "cuda" runs its 1x1 convolutions unfused (no kernel of either backend)."""
    conv2d = conv.PointwiseConv2d(4, 6)
    conv2d.backend = backend
    layer_norm = norm.LayerNorm2d(4)
    x = torch.randn(1, 4, 3, 3)
    assert conv2d._fusion_choice(x, layer_norm, None) is None
    assert torch.equal(conv2d.fused(x, layer_norm), conv2d(layer_norm(x)))


@needs_triton
def test_inputs_the_unfused_layers_treat_otherwise_stay_unfused(calls):
    conv2d = conv.PointwiseConv2d(4, 6)
    conv2d.backend = "triton"
    layer_norm = norm.LayerNorm2d(4)
    x = torch.randn(2, 4, 3, 3)
    # A residual that broadcasts, and activations in another dtype than the weights (nn.Conv2d's
    # own error, as before the fusion).
    broadcast = torch.randn(1, 6, 1, 3)
    assert torch.equal(conv2d.fused(x, residual=broadcast), conv2d(x) + broadcast)
    with pytest.raises(RuntimeError) as want:
        conv.nn.Conv2d.forward(conv2d, x.double())
    with pytest.raises(RuntimeError) as got:
        conv2d.fused(x.double(), layer_norm)
    assert str(got.value) == str(want.value)
    assert calls["norm"] == calls["residual"] == 0
    # Nothing to fuse: the plain convolution.
    assert torch.equal(conv2d.fused(x), conv2d(x))


@needs_triton
def test_fused_block_compiles_to_one_graph(calls, fold_always):
    model = perturbed_model().set_backend("triton")
    block = next(m for m in model.modules() if isinstance(m, EncoderBlock)).eval()
    x = torch.randn(1, block.norms[0].body.weight.shape[0], 6, 5)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)
    assert calls["norm"] > 0 and calls["residual"] > 0 and calls["attention"] > 0


@needs_triton
def test_set_trunk_fusion_off_runs_every_backend_unfused(calls):
    model = perturbed_model().set_backend("triton").eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        fused = model(x)
        assert calls["norm"] > 0 and calls["layernorm"] == 0
        counts = dict(calls)
        unfused = model.set_trunk_fusion(False)(x)
    encoder_blocks, decoder_blocks = blocks(model)
    assert calls["norm"] == counts["norm"] and calls["residual"] == counts["residual"]
    assert calls["tail"] == counts["tail"] == encoder_blocks + decoder_blocks  # none while off
    assert calls["layernorm"] == 2 * (encoder_blocks + decoder_blocks)
    torch.testing.assert_close(unfused, fused, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        model.set_trunk_fusion("off")


@needs_triton
@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
def test_attend_is_the_projection_of_attn_at_v_with_gradients(residual, calls, fold_always):
    """project_out(attn @ v) + residual through the folded per-image weight (backend "triton")
    against the unfused layers, forward and the gradients of v (a chunk of a qkv tensor, as in
    the attention), the map, the projection's parameters and the residual."""
    torch.manual_seed(0)
    proj = conv.PointwiseConv2d(12, 10)
    qkv = torch.randn(2, 36, 5, 7, requires_grad=True)
    attn = torch.randn(2, 3, 4, 4).softmax(-1).requires_grad_(True)
    skip = torch.randn(2, 10, 5, 7, requires_grad=True) if residual else None
    leaves = [qkv, attn, proj.weight, proj.bias] + ([skip] if residual else [])
    grad_y = torch.randn(2, 10, 5, 7)
    results = []
    for backend in ("reference", "triton"):
        proj.backend = backend
        y = proj.attend(qkv.chunk(3, dim=1)[2], attn, skip)
        results.append((y, torch.autograd.grad(y, leaves, grad_y)))
    (want, want_grads), (got, got_grads) = results
    assert calls["attention"] == 1  # the triton call folded, the reference's did not
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip(("qkv", "attn", "weight", "bias", "residual"), got_grads, want_grads, strict=False):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


def test_attend_unfused_is_the_projection_of_attn_at_v():
    torch.manual_seed(0)
    proj = conv.PointwiseConv2d(8, 6)
    proj.backend = "reference"
    v, attn, skip = torch.randn(2, 8, 3, 5), torch.randn(2, 2, 4, 4).softmax(-1), torch.randn(2, 6, 3, 5)
    out = (attn @ v.reshape(2, 2, 4, 15)).reshape(2, 8, 3, 5)
    assert torch.equal(proj.attend(v, attn, skip), proj(out) + skip)


@needs_triton
def test_attend_folds_only_images_with_many_pixels_per_channel(calls):
    proj = conv.PointwiseConv2d(16, 16)
    proj.backend = "triton"
    attn = torch.randn(1, 2, 8, 8).softmax(-1)
    threshold = conv.FOLD_MIN_PIXELS_PER_CHANNEL * 16
    with torch.no_grad():
        proj.attend(torch.randn(1, 16, 1, threshold - 1), attn)
        assert calls["attention"] == 0
        proj.attend(torch.randn(1, 16, 1, threshold), attn)
    assert calls["attention"] == 1


@needs_triton
def test_a_fresh_model_compiles_before_any_eager_call():
    """set_backend loads every op's implementation, so that Dynamo never meets an import: a
    block compiled with fullgraph=True as the process's first call traces (in a fresh process,
    where nothing else loaded them)."""
    script = (
        "import torch, moceir\n"
        "from moceir.layers.blocks import EncoderBlock\n"
        "m = moceir.build_model('moce_ir_s', backend='triton')\n"
        "block = next(x for x in m.modules() if isinstance(x, EncoderBlock)).eval()\n"
        "x = torch.randn(1, block.norms[0].body.weight.shape[0], 6, 5)\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(block, backend='aot_eager', fullgraph=True)(x)\n"
        "    assert torch.allclose(y, block(x), atol=1e-5), 'compiled block differs'\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
