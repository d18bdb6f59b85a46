"""moceir.cuda_graphs on a GPU: a captured inference forward and a captured training step give
what the eager model gives, and building them changes nothing the caller had."""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.nn.functional as F

import moceir
from moceir.cuda_graphs import GraphedInference, GraphedTrainStep, UnusedExperts
from tests.model.test_backends_gpu import _backends
from tests.model.test_backends_gpu import _model as _perturbed_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("exact_fp32"),
]


def _model(backend: str) -> moceir.MoCEIR:
    return _perturbed_model().set_backend(backend)


def _loss(net, out, target):
    return F.l1_loss(out.float(), target) + 0.01 * net.total_loss


@pytest.mark.parametrize("backend", _backends())
def test_graphed_inference_matches_eager(backend):
    model = _model(backend).eval()
    graphed = GraphedInference(model, torch.rand(2, 3, 16, 24, device="cuda"))
    assert model.check_inputs and all(a.expert_path == "auto" for a in model.adapters())  # restored
    for _ in range(2):
        x = torch.rand(2, 3, 16, 24, device="cuda")
        got = graphed(x)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="captured shape"):
        graphed(torch.rand(1, 3, 16, 24, device="cuda"))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    "skip_unused", [True, False], ids=["unused-experts-skipped", "unused-experts-updated"]
)
def test_graphed_train_step_matches_eager_steps(backend, skip_unused):
    """Three replays make the steps of three eager sync-free steps, with the same guard of
    unused experts or without (same batches, same routing-noise seeds; batch 3 over 4 experts
    leaves experts unused). That the guarded step is our trainer's step is tested on the CPU
    (test_cuda_graphs.py). Building the graphed step changes nothing the caller had.

    Adam's first update is ~lr * sign(g): where a gradient is rounding-sized, the capture's
    and the eager run's rounding (cuDNN and cuBLAS pick their algorithms per run; on an H100 the
    cuda backend's qkv weights differed past 1e-5) turn into lr-sized differences. So the
    gradients of the first step are compared closely, and the weights' total movement over
    three steps by its relative norm."""
    eager = _model(backend).train().set_expert_path("sync_free")
    graphed_model = copy.deepcopy(eager)
    before = [p.detach().clone() for p in graphed_model.parameters()]
    opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)
    opt_graphed = torch.optim.AdamW(graphed_model.parameters(), lr=1e-3, capturable=True)
    batches = [
        (torch.rand(3, 3, 16, 24, device="cuda"), torch.rand(3, 3, 16, 24, device="cuda")) for _ in range(3)
    ]
    step = GraphedTrainStep(graphed_model, opt_graphed, _loss, *batches[0], skip_unused_experts=skip_unused)
    guard = UnusedExperts(eager.adapters(), opt_eager) if skip_unused else None
    for p, b in zip(graphed_model.parameters(), before, strict=True):
        assert torch.equal(p, b), "building the graphed step changed the weights"
    assert all(t.abs().sum() == 0 for s in opt_graphed.state.values() for t in s.values())
    for seed, (x, y) in enumerate(batches):
        torch.manual_seed(seed)
        got = step(x, y).clone()
        torch.manual_seed(seed)
        opt_eager.zero_grad(set_to_none=True)
        want = _loss(eager, eager(x), y)
        want.backward()
        torch.testing.assert_close(got, want.detach(), atol=1e-4, rtol=1e-4)
        if seed == 0:  # same weights: the graph's gradients (p.grad is the graph's) are eager's
            for (name, p), q in zip(eager.named_parameters(), graphed_model.parameters(), strict=True):
                if p.grad is not None:
                    torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)
        kept = guard.keep() if guard is not None else None
        opt_eager.step()
        if guard is not None:
            guard.undo(kept)
        if seed == 0:  # 3 images, k = 1: at least 1 of the 4 experts of every adapter unused
            unused = [
                list(ex.parameters())
                for a in graphed_model.adapters()
                for e, ex in enumerate(a.experts)
                if a.last_plan.counts[e].item() == 0
            ]
            assert len(unused) >= len(graphed_model.adapters())
            index = {id(p): i for i, p in enumerate(graphed_model.parameters())}
            untouched = [torch.equal(p, before[index[id(p)]]) for ps in unused for p in ps]
            # Skipped: bit for bit as before. Updated: AdamW's weight decay moved them.
            assert all(untouched) if skip_unused else not any(untouched)
    moved_graphed = torch.cat(
        [(q - b).flatten() for q, b in zip(graphed_model.parameters(), before, strict=True)]
    )
    moved_eager = torch.cat([(p - b).flatten() for p, b in zip(eager.parameters(), before, strict=True)])
    assert moved_eager.norm() > 0
    rel = ((moved_graphed - moved_eager).norm() / moved_eager.norm()).item()
    # A flipped sign puts an element ~2 lr per step from eager's: 0.25% flipped give rel ~ 0.1; a
    # missing or doubled step, or stale gradients, give rel ~ 1.
    assert rel < 0.1, f"the graphed steps moved the weights {rel:.2%} away from the eager steps"


def _step_both(graphed: GraphedTrainStep, twin: GraphedTrainStep, batch: int, seed: int):
    """One step of each on the same random batch (16 x 24) and routing-noise seed: their losses."""
    x, y = torch.rand(batch, 3, 16, 24, device="cuda"), torch.rand(batch, 3, 16, 24, device="cuda")
    torch.manual_seed(seed)
    got = graphed(x, y).clone()
    torch.manual_seed(seed)
    return got, twin(x, y)


@pytest.mark.parametrize("backend", _backends())
def test_graphed_train_step_with_accumulation_matches_its_uncaptured_twin(backend):
    """``accumulation=2`` captured: both micro-batches' forward and backward and one AdamW step
    in the graph give the step of the same object run without a graph (``capture=False``, eager
    on the GPU, same seeds): losses, the first step's gradients, the summed routing counts."""
    twin_model = _model(backend).train()
    graphed_model = copy.deepcopy(twin_model)
    opt_twin = torch.optim.AdamW(twin_model.parameters(), lr=1e-3, capturable=True)
    opt_graphed = torch.optim.AdamW(graphed_model.parameters(), lr=1e-3, capturable=True)
    x0 = torch.rand(4, 3, 16, 24, device="cuda")
    graphed = GraphedTrainStep(graphed_model, opt_graphed, _loss, x0, x0, accumulation=2)
    twin = GraphedTrainStep(twin_model, opt_twin, _loss, x0, x0, accumulation=2, capture=False)
    for seed in range(2):
        got, want = _step_both(graphed, twin, 4, seed)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(graphed.routing_counts, twin.routing_counts)
        assert int(graphed.routing_counts.sum(1).max()) == 4
        if seed == 0:
            for (name, p), q in zip(twin_model.named_parameters(), graphed_model.parameters(), strict=True):
                if p.grad is not None:
                    torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backend", _backends())
def test_graphed_train_step_with_fp16_loss_scaling_matches_its_uncaptured_twin(backend):
    """float16 autocast with a DeviceLossScaler, captured, against the same step without a
    graph: the same losses and scale; a first scale that overflows is undone in both (weights
    unchanged) and backed off."""
    from moceir.cuda_graphs import DeviceLossScaler  # noqa: PLC0415

    twin_model = _model(backend).train()
    graphed_model = copy.deepcopy(twin_model)
    before = [p.detach().clone() for p in graphed_model.parameters()]
    scalers = [DeviceLossScaler("cuda", init_scale=2.0**127, growth_interval=1) for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, capturable=True) for m in (graphed_model, twin_model)]
    x0 = torch.rand(2, 3, 16, 24, device="cuda")
    kwargs = dict(autocast_dtype=torch.float16, clip_grad=1.0)
    graphed = GraphedTrainStep(graphed_model, opts[0], _loss, x0, x0, loss_scaler=scalers[0], **kwargs)
    twin = GraphedTrainStep(
        twin_model, opts[1], _loss, x0, x0, loss_scaler=scalers[1], capture=False, **kwargs
    )
    assert scalers[0].state_dict()["scale"] == 2.0**127  # the warm-up's changes were put back
    for seed in range(4):
        got, want = _step_both(graphed, twin, 2, seed)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        assert scalers[0].state_dict() == scalers[1].state_dict()
        if seed == 0:
            assert scalers[0].found_inf.item() == 1.0
            assert all(torch.equal(p, b) for p, b in zip(graphed_model.parameters(), before, strict=True))
    assert all(torch.isfinite(p).all() for p in graphed_model.parameters())


@pytest.mark.parametrize("backend", _backends())
def test_graphed_train_step_bf16_autocast_and_lr(backend):
    """bf16 autocast inside the graph trains (finite loss); a tensor learning rate set to 0
    between replays leaves the weights unchanged (AdamW's decay is lr-scaled too)."""
    model = _model(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    x, y = torch.rand(2, 3, 16, 24, device="cuda"), torch.rand(2, 3, 16, 24, device="cuda")
    step = GraphedTrainStep(model, opt, _loss, x, y, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(step(x, y)).item()
    step.set_lr(0.0)
    frozen = [p.detach().clone() for p in model.parameters()]
    step(x, y)
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), frozen, strict=True))


def test_graphed_train_step_refuses_what_it_cannot_capture():
    model = _model("auto")
    x = torch.rand(2, 3, 16, 24, device="cuda")
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters()), _loss, x, x)
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), _loss, x, x)
    with pytest.raises(ValueError, match="fast backend"):
        opt = torch.optim.AdamW(model.parameters(), capturable=True)
        GraphedTrainStep(model.set_backend("reference"), opt, _loss, x, x)
    model.set_backend("auto")
    step = GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), capturable=True), _loss, x, x)
    with pytest.raises(ValueError, match="captured shape"):
        step(x[:1], x[:1])
    with pytest.raises(ValueError, match="tensor lr"):
        step.set_lr(1e-4)


def test_graphed_restorer_matches_the_eager_restorer_on_tiles():
    """``moceir restore --cuda-graph``: tiles (a short last batch filled up) replayed from one
    graph give the eager tiles' blend and the same routing counts."""
    import numpy as np  # noqa: PLC0415

    from moceir.restore import Restorer  # noqa: PLC0415

    model = _model("auto").eval()
    image = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
    cuda = torch.device("cuda")
    runs = [
        Restorer(model, cuda, batch_size=5, tile=16, tile_overlap=4, cuda_graph=g)([image])[0] for g in (0, 1)
    ]
    np.testing.assert_allclose(runs[1].image, runs[0].image, atol=1e-4)
    assert runs[1].expert_counts == runs[0].expert_counts and runs[1].tiles == 12


def test_graphed_train_step_captures_the_gradient_all_reduce():
    """``process_group``: the gradients' and routing counts' NCCL all-reduces are captured in the
    graph. With a one-rank group (this machine's one GPU) averaging changes nothing, so the
    captured step equals the same step without a group; the two-rank arithmetic is tested on
    the CPU (tests/cli/test_ddp.py, gloo, without a graph)."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(
            "nccl", init_method="tcp://127.0.0.1:29511", world_size=1, rank=0,
            timeout=datetime.timedelta(seconds=60),  # a stuck start must not eat the GPU run
        )  # fmt: skip
    try:
        plain_model = _model("auto").train()
        group_model = copy.deepcopy(plain_model)
        opt_plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, capturable=True)
        opt_group = torch.optim.AdamW(group_model.parameters(), lr=1e-3, capturable=True)
        x0 = torch.rand(3, 3, 16, 24, device="cuda")
        with_group = GraphedTrainStep(group_model, opt_group, _loss, x0, x0, process_group=dist.group.WORLD)
        plain = GraphedTrainStep(plain_model, opt_plain, _loss, x0, x0)
        for seed in range(2):
            got, want = _step_both(with_group, plain, 3, seed)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert torch.equal(with_group.routing_counts, plain.routing_counts)
        for p, q in zip(plain_model.parameters(), group_model.parameters(), strict=True):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)
    finally:
        if started:
            dist.destroy_process_group()
