"""The model against the spec: keys, sizes, and a second implementation (spec_model.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moceir
from moceir.layers.adapter import routing_aux_loss
from moceir.model import pad_to_multiple
from tests.model.spec_model import spec_forward

DATA = Path(__file__).parents[1] / "data"


def spec_keys(name):
    lines = (DATA / f"state_dict_{name}.tsv").read_text().splitlines()[1:]
    return [
        (k, tuple(int(d) for d in s.strip("()").split(",") if d.strip()))
        for k, s in (ln.split("\t") for ln in lines)
    ]


@pytest.mark.parametrize(("name", "params"), [("moce_ir_s", 11_477_752), ("moce_ir", 25_353_796)])
def test_state_dict_matches_official_keys_and_sizes(name, params):
    model = moceir.build_model(name)
    state = model.state_dict()
    expected = spec_keys(name)
    assert list(state) == [k for k, _ in expected]  # same keys, same order
    assert {k: tuple(v.shape) for k, v in state.items()} == dict(expected)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name", ["moce_ir_s", "moce_ir"])
def test_adapters_are_every_moce_layer_in_forward_order(name):
    from moceir.layers.adapter import MoCELayer  # noqa: PLC0415

    model = moceir.build_model(name)
    found = [m for m in model.modules() if isinstance(m, MoCELayer)]
    assert len(found) == sum(model.config.num_dec_blocks)
    assert [id(a) for a in model.adapters()] == [id(m) for m in found]
    called: list[tuple[int, int]] = []  # (adapter, input width) in the order a forward runs them

    def record(module, args):
        called.append((id(module), args[0].shape[1]))

    hooks = [a.register_forward_pre_hook(record) for a in found]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert [i for i, _ in called] == [id(a) for a in model.adapters()]
    widths = [w for _, w in called]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]  # deepest level first


def test_complexity_buffer_is_relative_parameter_count():
    adapter = moceir.build_model("moce_ir_s").adapters()[0]
    sizes = torch.tensor(
        [sum(p.numel() for p in ex.parameters()) for ex in adapter.experts], dtype=torch.float32
    )
    torch.testing.assert_close(adapter.routing.complexity, sizes / sizes.max())
    assert adapter.routing.complexity[-1] == 1 and (adapter.routing.complexity.diff() > 0).all()


def params_of(model):
    return dict(model.named_parameters()) | dict(model.named_buffers())


def test_eval_matches_spec_implementation(small_model):
    model = small_model.eval()
    torch.manual_seed(1)
    x = torch.rand(3, 3, 16, 24)
    with torch.no_grad():
        ours = model(x)
        ref, ref_loss = spec_forward(params_of(model), x, model.config, training=False)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    assert float(model.total_loss) == 0.0 and float(ref_loss) == 0.0


def test_train_matches_spec_implementation_outputs_loss_and_gradients(small_model):
    model = small_model.train()
    cfg = model.config
    std = cfg.noise_std or 1.0 / cfg.num_experts
    x = torch.rand(2, 3, 16, 16)

    torch.manual_seed(7)
    ours = model(x)
    (ours.square().mean() + model.total_loss).backward()
    # Experts no image chose get no gradient (None), in the official code too.
    our_grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # The official code draws randn_like(logits) once per adapter in forward order: same seed,
    # same draws.
    params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in params_of(model).items()}
    torch.manual_seed(7)
    ref, ref_loss = spec_forward(params, x, cfg, training=True, noise_fn=lambda t: torch.randn_like(t) * std)
    (ref.square().mean() + ref_loss).backward()

    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model.total_loss, ref_loss, atol=1e-6, rtol=1e-4)
    assert model.total_loss.item() > 0
    unused = [n for n, g in our_grads.items() if g is None]
    assert all(".experts." in n for n in unused)
    zero = torch.zeros_like
    for name, grad in our_grads.items():
        # An expert no image chose has no gradient (None) or a zero one (packed weights).
        ours = zero(params[name]) if grad is None else grad
        ref = zero(params[name]) if params[name].grad is None else params[name].grad
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-3, msg=name)
    model.eval()


def test_batch_equals_images_one_by_one(small_model):
    model = small_model.eval()
    torch.manual_seed(2)
    # Different kinds of images so that they are likely routed differently.
    x = torch.stack([torch.rand(3, 24, 16), torch.rand(3, 24, 16) * 0.1, torch.randn(3, 24, 16).clamp(-1, 1)])
    with torch.no_grad():
        batched = model(x)
        batched_choices = torch.cat(model.routing_choices(), 1)
        single = []
        for i in range(x.shape[0]):
            single.append(model(x[i : i + 1]))
            assert torch.equal(torch.cat(model.routing_choices(), 1)[0], batched_choices[i])
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-5, rtol=1e-5)


def test_eval_is_deterministic_and_eval_noise_is_opt_in(small_model):
    model = small_model.eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
        assert torch.equal(a, b)
        for adapter in model.adapters():
            adapter.eval_noise = True
        try:
            torch.manual_seed(0)
            c = model(x)
            torch.manual_seed(1)
            d = model(x)
        finally:
            for adapter in model.adapters():
                adapter.eval_noise = False
    assert not torch.equal(c, d)


def test_experts_run_only_on_their_images(small_model):
    model = small_model.eval()
    seen = {}

    def record(name):
        def hook(_module, inputs, _output):
            seen[name] = seen.get(name, 0) + inputs[0].shape[0]

        return hook

    handles = []
    adapters = model.adapters()
    for a_i, adapter in enumerate(adapters):
        for e, ex in enumerate(adapter.experts):
            handles.append(ex[0].proj[0].register_forward_hook(record((a_i, e))))
    try:
        with torch.no_grad():
            model(torch.rand(3, 3, 16, 16))
    finally:
        for h in handles:
            h.remove()
    for a_i, adapter in enumerate(adapters):
        counts = adapter.last_plan.counts.tolist()
        for e, n in enumerate(counts):
            assert seen.get((a_i, e), 0) == n
        assert sum(counts) == 3


@pytest.mark.parametrize(("dtype", "atol"), [(torch.bfloat16, 0.1), (torch.float16, 0.05)])
def test_model_fully_cast_to_half_precision(small_model, dtype, atol):
    model = small_model.eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        half = moceir.build_model("moce_ir_s", backend="reference")
        half.load_state_dict(model.state_dict())
        half = half.to(dtype).eval()
        out = half(x.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


def test_autocast_bf16_runs_and_stays_close(small_model):
    model = small_model.eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0)


@pytest.mark.parametrize(
    "shape", [(1, 3, 37, 53), (2, 3, 9, 8), (1, 3, 3, 5)], ids=["37x53", "9x8", "3x5-replicate"]
)
def test_any_size_is_padded_and_cropped(small_model, shape):
    model = small_model.eval()
    torch.manual_seed(3)
    x = torch.rand(shape)
    with torch.no_grad():
        out = model(x)
        padded = pad_to_multiple(x)
        ref, _ = spec_forward(params_of(model), padded, model.config)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref[..., : shape[2], : shape[3]], atol=2e-5, rtol=1e-4)


def test_pad_uses_reflection():
    x = torch.arange(9.0).view(1, 1, 1, 9).expand(1, 1, 9, 9)
    torch.testing.assert_close(pad_to_multiple(x), F.pad(x, (0, 7, 0, 7), mode="reflect"))


def test_aux_loss_against_formulas():
    torch.manual_seed(4)
    logits = torch.randn(5, 4)
    noisy = logits + torch.randn(5, 4) * 0.25
    complexity = torch.tensor([0.1, 0.2, 0.5, 1.0])
    probs = logits.softmax(-1)
    imp = probs.sum(0) * complexity
    loss_imp = (imp.std(unbiased=True) / (imp.mean() + 1e-8)) ** 2
    normal = torch.distributions.Normal(0.0, 1.0)
    for k in (1, 2, 4):
        t = torch.stack([noisy[b].sort(descending=True).values[k - 1] for b in range(5)]).unsqueeze(1)
        pm = (1 - normal.cdf((t - logits) / 0.25)).mean(0)
        loss_load = (pm.std() / (pm.mean() + 1e-8)) ** 2
        expected = 0.5 * loss_imp + 0.5 * loss_load
        torch.testing.assert_close(routing_aux_loss(logits, noisy, k, 0.25, complexity), expected)
    no_bias = routing_aux_loss(logits, noisy, 1, 0.25, None)
    imp0 = probs.sum(0)
    assert no_bias > 0 and not torch.isclose(no_bias, routing_aux_loss(logits, noisy, 1, 0.25, complexity))
    assert torch.isfinite(imp0).all()


def test_total_loss_zero_in_eval_and_differentiable_in_train(small_model):
    model = small_model
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        model(x)
    assert float(model.total_loss) == 0.0
    model.train()
    model(x)
    assert model.total_loss.requires_grad and torch.isfinite(model.total_loss)
    model.eval()


@pytest.mark.parametrize("top_k", [2, 4])
def test_top_k_above_one_matches_spec(top_k):
    torch.manual_seed(5)
    model = moceir.build_model("moce_ir_s", top_k=top_k, backend="reference").eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ours = model(x)
        ref, _ = spec_forward(params_of(model), x, model.config)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
