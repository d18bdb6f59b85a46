"""moceir.cuda_graphs without a GPU: what it refuses, with messages that say why (the captures
themselves are tested on a GPU in test_cuda_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch

import moceir
from moceir.cuda_graphs import GraphedInference, GraphedTrainStep
from tests.model.test_backends_gpu import SMALL


def _loss(net, out, target):
    return (out - target).abs().mean() + net.total_loss


def test_a_model_on_the_cpu_is_refused_before_anything_runs():
    model = moceir.build_model("moce_ir_s", backend="reference", **SMALL)
    x = torch.rand(1, 3, 8, 8)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedInference(model, x)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters()), _loss, x, x)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_the_module_is_exported():
    assert moceir.GraphedInference is GraphedInference
    assert moceir.GraphedTrainStep is GraphedTrainStep


def test_unused_experts_guard_turns_a_sync_free_step_into_the_trainers_step():
    """What GraphedTrainStep replays, run eagerly on the CPU: sync-free steps with the guard reach
    the weights and optimizer state of our trainer's steps (gradients of experts no image chose
    set to None from the counts read on the host, skipped by the optimizer); without the guard
    they do not. SGD with
    momentum and weight decay: stateful like Adam, but linear in the gradients, so the two
    paths' rounding differences stay rounding-sized (Adam's first step is ~lr * sign(g))."""
    import copy  # noqa: PLC0415

    from moceir.cuda_graphs import UnusedExperts  # noqa: PLC0415

    torch.manual_seed(0)
    per_expert = moceir.build_model("moce_ir_s", backend="reference", **SMALL).train()
    per_expert.set_expert_path("per_expert")
    guarded = copy.deepcopy(per_expert).set_expert_path("sync_free")
    unguarded = copy.deepcopy(guarded)
    models = (per_expert, guarded, unguarded)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.05) for m in models]
    guard = UnusedExperts(guarded.adapters(), opts[1])
    for seed in range(3):
        x, y = torch.rand(3, 3, 16, 24), torch.rand(3, 3, 16, 24)  # 3 images, 4 experts: some unused
        for model, opt in zip(models, opts, strict=True):
            torch.manual_seed(100 + seed)
            opt.zero_grad(set_to_none=True)
            _loss(model, model(x), y).backward()
            if model is per_expert:  # what moceir.train.Trainer.step does after its host read
                for a in model.adapters():
                    for e, ex in enumerate(a.experts):
                        if a.last_plan.counts[e].item() == 0:
                            for p in ex.parameters():
                                p.grad = None
            kept = guard.keep() if model is guarded else None
            opt.step()
            if model is guarded:
                guard.undo(kept)
        assert any(c.item() == 0 for a in guarded.adapters() for c in a.last_plan.counts)
    want = dict(per_expert.named_parameters())
    for name, p in guarded.named_parameters():
        torch.testing.assert_close(p, want[name], atol=1e-6, rtol=1e-5, msg=name)
    state = {n: opts[0].state.get(p, {}) for n, p in per_expert.named_parameters()}
    for name, p in guarded.named_parameters():
        for k, v in opts[1].state.get(p, {}).items():
            # A never-chosen expert has no state eagerly and a zeroed one here: the same start.
            torch.testing.assert_close(v, state[name].get(k, torch.zeros_like(v)), atol=1e-6, rtol=1e-5)
    differ = [
        n for n, p in unguarded.named_parameters() if not torch.allclose(p, want[n], atol=1e-6, rtol=1e-5)
    ]
    assert differ, "without the guard the unused experts should have been decayed and moved"


def test_uncaptured_step_is_the_captured_steps_computation_on_the_cpu():
    """``capture=False`` runs the body a graph would capture (sync-free path, clipping, AdamW,
    unused experts undone) eagerly: bit for bit the same as writing those steps out by hand."""
    import copy  # noqa: PLC0415

    from moceir.cuda_graphs import UnusedExperts  # noqa: PLC0415

    torch.manual_seed(0)
    by_hand = moceir.build_model("moce_ir_s", backend="reference", **SMALL).train()
    model = copy.deepcopy(by_hand)
    opt_hand = torch.optim.AdamW(by_hand.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.rand(3, 3, 16, 24)
    step = GraphedTrainStep(model, opt, _loss, x0, x0, clip_grad=0.5, capture=False)
    assert model.check_inputs and all(a.expert_path == "auto" for a in model.adapters())
    step.set_lr(5e-4)
    assert opt.param_groups[0]["lr"] == 5e-4
    opt_hand.param_groups[0]["lr"] = 5e-4
    guard = UnusedExperts(by_hand.adapters(), opt_hand)
    by_hand.set_expert_path("sync_free")
    for seed in range(2):
        x, y = torch.rand(3, 3, 16, 24), torch.rand(3, 3, 16, 24)
        torch.manual_seed(seed)
        got = step(x, y)
        torch.manual_seed(seed)
        opt_hand.zero_grad(set_to_none=True)
        want = _loss(by_hand, by_hand(x), y)
        want.backward()
        torch.nn.utils.clip_grad_norm_([p for p in by_hand.parameters() if p.grad is not None], 0.5)
        kept = guard.keep()
        opt_hand.step()
        guard.undo(kept)
        assert torch.equal(got, want.detach())
    for p, q in zip(by_hand.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="captured shape"):
        step(x[:1], y[:1])
    with pytest.raises(ValueError, match="clip_grad"):
        GraphedTrainStep(model, opt, _loss, x0, x0, clip_grad=-1.0, capture=False)


def test_uncaptured_step_with_accumulation_sums_its_micro_batches_on_the_cpu():
    """``accumulation=2``: the batch's two halves run forward and backward in turn (losses
    halved, gradients summed), then one clipped AdamW step whose unused experts are those no
    image of either half chose: bit for bit the same as writing that out by hand. The step's loss
    is the halves' mean and ``routing_counts`` sums their routing counts."""
    import copy  # noqa: PLC0415

    from moceir.cuda_graphs import UnusedExperts  # noqa: PLC0415

    torch.manual_seed(0)
    by_hand = moceir.build_model("moce_ir_s", backend="reference", **SMALL).train()
    model = copy.deepcopy(by_hand)
    opt_hand = torch.optim.AdamW(by_hand.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.rand(4, 3, 16, 24)
    step = GraphedTrainStep(model, opt, _loss, x0, x0, clip_grad=0.5, capture=False, accumulation=2)
    guard = UnusedExperts(by_hand.adapters(), opt_hand)
    by_hand.set_expert_path("sync_free")
    for seed in range(2):
        x, y = torch.rand(4, 3, 16, 24), torch.rand(4, 3, 16, 24)
        torch.manual_seed(seed)
        got = step(x, y)
        torch.manual_seed(seed)
        opt_hand.zero_grad(set_to_none=True)
        losses, counts = [], 0
        for half in (slice(0, 2), slice(2, 4)):
            loss = _loss(by_hand, by_hand(x[half]), y[half])
            (loss / 2).backward()
            losses.append(loss.detach())
            counts = counts + torch.stack([a.last_plan.counts for a in by_hand.adapters()])
        torch.nn.utils.clip_grad_norm_([p for p in by_hand.parameters() if p.grad is not None], 0.5)
        kept = guard.keep()
        opt_hand.step()
        guard.undo(kept, counts)
        assert torch.equal(got, torch.stack(losses).mean())
        assert torch.equal(step.routing_counts, counts)
        assert int(counts.sum(1).max()) == 4  # every adapter routed all 4 images (k = 1)
    for p, q in zip(by_hand.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("accumulation", "batch", "match"),
    [(0, 4, "accumulation must be an int >= 1"), (True, 4, "accumulation must be"), (3, 4, "a multiple of")],
)
def test_accumulation_is_checked(accumulation, batch, match):
    model = moceir.build_model("moce_ir_s", backend="reference", **SMALL)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.rand(batch, 3, 16, 24)
    with pytest.raises(ValueError, match=match):
        GraphedTrainStep(model, opt, _loss, x, x, capture=False, accumulation=accumulation)


def test_loss_scaler_must_be_the_device_one():
    model = moceir.build_model("moce_ir_s", backend="reference", **SMALL)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.rand(2, 3, 16, 24)
    with pytest.raises(ValueError, match="loss_scaler must be a moceir.cuda_graphs.DeviceLossScaler"):
        GraphedTrainStep(model, opt, _loss, x, x, capture=False, loss_scaler=torch.amp.GradScaler("cpu"))
    for bad in (dict(init_scale=0.0), dict(backoff_factor=1.0), dict(growth_interval=0)):
        with pytest.raises(ValueError, match="DeviceLossScaler needs"):
            moceir.DeviceLossScaler("cpu", **bad)


def test_device_loss_scaler_is_grad_scalers_arithmetic():
    """Unscaling and the scale's updates agree with torch.amp.GradScaler bit for bit over finite
    and non-finite steps (growth after growth_interval finite ones, back-off after Inf/NaN), and
    the state round-trips through GradScaler's keys."""
    from moceir.cuda_graphs import DeviceLossScaler  # noqa: PLC0415

    ours = DeviceLossScaler("cpu", init_scale=2.0**10, growth_interval=2)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    grads = ([1.0, 2.0, 3.0], [0.5, 0.25, 8.0], [1.0, float("inf"), 0.0], [float("nan"), 1.0, 1.0], [2.0] * 3)
    for grad in grads:
        g = torch.tensor(grad) * float(ours.scale)
        mine = [g.clone()]
        ours.unscale_(mine)
        p.grad = g.clone()
        theirs.scale(torch.ones(()))  # GradScaler creates its scale lazily, at the first scale()
        theirs.unscale_(opt)
        torch.testing.assert_close(mine[0], p.grad, atol=0, rtol=0, equal_nan=True)
        assert bool(ours.found_inf > 0) == (not torch.tensor(grad).isfinite().all())
        theirs.step(opt)
        theirs.update()
        ours.update()
        assert ours.state_dict() == theirs.state_dict()
    other = DeviceLossScaler("cpu")
    other.load_state_dict(theirs.state_dict())
    assert other.state_dict() == theirs.state_dict()
    with pytest.raises(ValueError, match="growth_factor > 1"):
        DeviceLossScaler("cpu", growth_factor=1.0)


def test_uncaptured_step_with_loss_scaling_skips_non_finite_steps_like_grad_scaler():
    """``loss_scaler``: the same steps as the eager GradScaler loop, bit for bit, including a
    first step whose scaled gradients overflow (GradScaler skips it; here it is undone: weights
    and AdamW state as before, a fresh state where the step created one) and the backed-off scale."""
    import copy  # noqa: PLC0415

    from moceir.cuda_graphs import DeviceLossScaler, UnusedExperts  # noqa: PLC0415

    torch.manual_seed(0)
    by_hand = moceir.build_model("moce_ir_s", backend="reference", **SMALL).train()
    model = copy.deepcopy(by_hand)
    opt_hand = torch.optim.AdamW(by_hand.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    huge = 2.0**127  # gradients above 2 times this overflow float32 (GradScaler backs off)
    scaler_hand = torch.amp.GradScaler("cpu", init_scale=huge, growth_interval=1)
    ours = DeviceLossScaler("cpu", init_scale=huge, growth_interval=1)
    x0 = torch.rand(3, 3, 16, 24)
    step = GraphedTrainStep(model, opt, _loss, x0, x0, clip_grad=0.5, capture=False, loss_scaler=ours)
    guard = UnusedExperts(by_hand.adapters(), opt_hand)
    by_hand.set_expert_path("sync_free")
    start = [p.detach().clone() for p in model.parameters()]
    skipped = []
    for seed in range(6):
        x, y = torch.rand(3, 3, 16, 24), torch.rand(3, 3, 16, 24)
        torch.manual_seed(seed)
        step(x, y)
        skipped.append(bool(ours.found_inf > 0))
        torch.manual_seed(seed)
        opt_hand.zero_grad(set_to_none=True)
        scaler_hand.scale(_loss(by_hand, by_hand(x), y)).backward()
        scaler_hand.unscale_(opt_hand)
        torch.nn.utils.clip_grad_norm_([p for p in by_hand.parameters() if p.grad is not None], 0.5)
        kept = guard.keep()
        scaler_hand.step(opt_hand)
        guard.undo(kept)
        scaler_hand.update()
        assert ours.state_dict() == scaler_hand.state_dict()
        if seed == 0:
            assert skipped[0], "the first step must overflow for this test to test the skip"
            assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True))
            assert all(float(t.abs().sum()) == 0 for s in opt.state.values() for t in s.values())
    assert not all(skipped), "the scale must have backed off to finite steps"
    for p, q in zip(by_hand.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_process_group_needs_torch_distributed():
    """A process group without an initialised torch.distributed: a clear error, not a hang in
    the first all-reduce."""
    import torch.distributed as dist  # noqa: PLC0415

    assert not dist.is_initialized()
    model = moceir.build_model("moce_ir_s", backend="reference", **SMALL)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.rand(2, 3, 16, 24)
    with pytest.raises(ValueError, match="process_group was given, but torch.distributed is not initialised"):
        GraphedTrainStep(model, opt, _loss, x, x, capture=False, process_group=object())
