"""The benchmark harness: provider discovery, every op's setup at toy sizes, byte counting,
the time breakdown and the order of the model jobs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common, models, ops
from moce_kernels import _backend
from moceir.layers.norm import LayerNorm2d
from tests.conftest import needs_triton_on_cpu


def resolves(op: str, backend: str, device: torch.device) -> bool:
    try:
        return _backend.resolve_backend(op, backend, device) == backend
    except RuntimeError:
        return False


@pytest.mark.parametrize("op", common.OPS)
def test_cpu_providers_are_what_resolve_backend_accepts(op):
    cpu = torch.device("cpu")
    providers, unavailable = common.op_providers(op, cpu)
    assert providers[0] == "reference"
    # conftest sets TRITON_INTERPRET=1, so resolve_backend may accept Triton here: the harness
    # still never times the interpreter.
    assert "triton" not in providers
    assert "Triton numbers need a CUDA GPU" in unavailable["triton"]
    assert ("cpu" in providers) == resolves(op, "cpu", cpu)
    assert "cuda" not in providers and unavailable["cuda"]
    assert set(providers[1:]) | set(unavailable) == set(common.FAST_BACKENDS)


def test_new_backends_are_discovered_without_editing_the_harness(monkeypatch):
    """Whatever resolve_backend accepts on a GPU is timed, in a fixed order."""
    accepted = {("grouped_dwconv", "triton"), ("grouped_dwconv", "cuda")}

    def fake_resolve(op, backend, device):
        if (op, backend) in accepted and device.type == "cuda":
            return backend
        raise RuntimeError(f"{op}: no {backend}")

    monkeypatch.setattr(_backend, "resolve_backend", fake_resolve)
    gpu = torch.device("cuda")
    assert common.op_providers("grouped_dwconv", gpu)[0] == ["reference", "triton", "cuda"]
    providers, unavailable = common.op_providers("layernorm2d", gpu)
    assert providers == ["reference"]
    assert unavailable == {b: f"layernorm2d: no {b}" for b in ("triton", "cuda", "cpu")}
    accepted.add(("layernorm2d", "triton"))
    assert common.op_providers("layernorm2d", gpu)[0] == ["reference", "triton"]


def test_measure_gives_a_median_of_several_samples():
    calls = []
    t = common.measure(lambda: calls.append(1), torch.device("cpu"), min_time_s=0.01)
    assert t.samples >= 1 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert len(calls) > 3


def test_every_op_runs_at_toy_sizes_and_matches_its_reference(monkeypatch):
    timed = []

    def one_call(fn, device, **kwargs):  # the harness's logic, not the timer's: one call each
        fn()
        timed.append(fn)
        return common.Timing(1.0, 0.9, 1.1, 1)

    monkeypatch.setattr(ops, "measure", one_call)
    cpu = torch.device("cpu")
    ceil = {"copy_gb_per_s": 10.0, "matmul_tflops": {"float32": 0.1}}
    rows: list[dict] = []
    for op in common.OPS:
        ops.run_op(op, cpu, [torch.float32], "tiny", ceil, rows.append, common.Deadline())
    assert len(timed) == len(rows)
    assert {r["op"] for r in rows} == set(common.OPS)
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for r in rows:
        assert r["median_ms"] == 1.0 and r["bytes"] > 0
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / 1e6)
        floor = max(r["bytes"] / 10e9 * 1e3, r["flops"] / 0.1e12 * 1e3)
        assert r["roofline_fraction"] == pytest.approx(floor / 1.0)
        # Forward rows compare outputs, the others gradients, with the reference of the same case.
        assert r["rel_err"] <= (0 if r["provider"] == "reference" else 1e-5)
    for op in common.OPS:
        modes = {r["mode"] for r in rows if r["op"] == op}
        assert modes == set(ops.MODES)


def test_bytes_moved_are_the_kernels_inputs_and_outputs():
    cpu = torch.device("cpu")
    (dispatch,) = ops.bench_dispatch(ops.SIZES["tiny"], cpu, torch.float32)
    x = dispatch.inputs[0]
    size = x.numel() * 4
    assert dispatch.bytes_moved == {"forward": 2 * size, "backward": 2 * size, "full": 4 * size}
    (ln,) = ops.bench_layernorm2d(ops.SIZES["tiny"], cpu, torch.bfloat16)
    x, w, b = ln.inputs
    assert ln.bytes_moved["forward"] == 2 * x.numel() * 2 + 2 * w.numel() * 2


@needs_triton_on_cpu
def test_grouped_pointwise_setup_runs_and_counts_active_channels(monkeypatch):
    """grouped_pointwise's setup, which the OPS-driven tests above skip until benchmarks.common.OPS
    lists the op: every mode at toy sizes, its bytes, and the Triton provider's forward and
    gradients (the interpreter here) against the reference's."""

    def one_call(fn, device, **kwargs):  # the harness's logic, not the timer's: one call each
        fn()
        return common.Timing(1.0, 0.9, 1.1, 1)

    monkeypatch.setattr(ops, "measure", one_call)
    cpu = torch.device("cpu")
    rows: list[dict] = []
    ceil = {"copy_gb_per_s": 10.0, "matmul_tflops": {"float32": 0.1}}
    ops.run_op("grouped_pointwise", cpu, [torch.float32], "tiny", ceil, rows.append, common.Deadline())
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert {r["mode"] for r in rows} == set(ops.MODES)
    benches = ops.bench_grouped_pointwise(ops.SIZES["tiny"], cpu, torch.float32)
    assert [b.case for b in benches] == ["dec2.experts_in", "dec2.experts_proj"]
    # Rows 1, 1, 0, 0 on ranks 1, 2, 4, 8 of width 8 at 16 x 16: experts_in reads 8 channels of
    # each row and writes 8 (Cout_max) of each; the weight is [4, 8, 8], no bias.
    experts_in = benches[0]
    plane = 16 * 16 * 4
    assert experts_in.bytes_moved["forward"] == 2 * 8 * plane + 4 * 8 * 8 * 4 + 2 * 8 * plane
    assert len(benches[1].inputs) == 3  # x, weight, bias
    for bench in benches:
        for got, want in zip(
            ops._gradients(bench, "triton"), ops._gradients(bench, "reference"), strict=True
        ):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(
                bench.forward("triton"), bench.forward("reference"), atol=1e-5, rtol=1e-5
            )


def test_expired_deadline_skips_and_says_so():
    rows: list[dict] = []
    ceil = {"copy_gb_per_s": 10.0, "matmul_tflops": {}}
    ops.run_op(
        "dispatch", torch.device("cpu"), [torch.float32], "tiny", ceil, rows.append, common.Deadline(0.0)
    )
    assert rows and all(r["status"] == "skipped" and "budget" in r["error"] for r in rows)


def test_routing_spread_is_the_complexity_biased_one():
    plan = ops._plan(8, torch.device("cpu"))
    assert plan.counts.tolist() == [3, 2, 2, 1]


def test_byte_counter_counts_inputs_and_outputs_once_and_skips_views():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(4, 4, 3, 3)
    dst = torch.empty(2, 4, 8, 8)
    counter = models.ByteCounter()
    with torch.no_grad(), counter:
        y = F.conv2d(x, w, padding=1)
        y.view(-1)[:10]  # views move nothing
        torch.ops.aten._unsafe_view(y, (-1,))  # nor does a view whose schema does not say so
        dst.copy_(x)  # reads x, writes dst
    assert counter.total == 4 * (x.numel() + w.numel() + y.numel()) + 4 * 2 * x.numel()
    assert set(counter.by_op) == {"aten::convolution", "aten::copy_"}


def test_breakdown_splits_self_time_by_module_type():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 16, 1),
        LayerNorm2d(16),
        nn.Conv2d(16, 3, 3, padding=1),
    )
    x = torch.randn(2, 8, 32, 32)

    def run():
        with torch.no_grad():
            return model(x)

    split = models.breakdown(model, run, torch.device("cpu"))
    names = {c["category"] for c in split["categories"]}
    assert {"conv depthwise 3x3", "conv 1x1", "layernorm", "conv 3x3", "Sequential"} <= names
    assert split["total_ms"] > 0
    assert sum(c["ms"] for c in split["categories"]) == pytest.approx(split["total_ms"], rel=1e-6)
    # The hooks are gone afterwards.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_model_jobs_run_the_training_step_and_its_compiled_reference_first():
    wls = models.workloads(torch.device("cuda"), "full")
    assert wls[0].kind == "video" and (wls[0].height, wls[0].width) == (1080, 1920)
    assert any(w.kind == "training" and w.batch == 8 and w.precision == "bf16-autocast" for w in wls)
    assert any(w.kind == "inference" and (w.batch, w.height) == (16, 256) for w in wls)
    jobs = models.plan_jobs(wls, ["reference", "triton"], compile_reference=True, size="full")
    main = wls[: models.MAIN_WORKLOADS]
    # The training step first, eager, then compiled: the reference, then the fastest backend.
    training = next(wl for wl in wls if wl.kind == "training" and wl.compile)
    assert jobs[:4] == [(training, "reference"), (training, "triton"),
                        (training, "compiled-reference"), (training, "compiled-auto")]  # fmt: skip
    # Then the eager providers on the other main workloads.
    others = jobs[4 : 4 + 2 * (len(main) - 1)]
    assert all(wl in main and wl is not training and not p.startswith("compiled-") for wl, p in others)
    assert len(jobs) == 2 * len(wls) + 2 * sum(w.compile for w in wls)
    no_compile = models.plan_jobs(wls, ["reference"], compile_reference=False, size="full")
    assert all(p == "reference" for _, p in no_compile)
    only_ref = models.plan_jobs(wls, ["reference"], True, "full", compiled_providers=("compiled-reference",))
    assert [p for _, p in only_ref if p.startswith("compiled-")] == ["compiled-reference"] * sum(
        w.compile for w in wls
    )


def test_model_providers_can_be_chosen(tmp_path):
    from benchmarks import run  # noqa: PLC0415

    with pytest.raises(SystemExit):
        run.parse_args(["--model-providers", "reference,nonsense"])
    assert run.main(["--suite", "models", "--tiny", "--threads", "1", "--workloads", "inference",
                     "--model-providers", "reference", "--output", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["results"]
    assert [r["provider"] for r in rows] == ["reference"]


def test_issue_shapes_are_the_issues_inference_workloads(tmp_path, monkeypatch):
    from benchmarks import run  # noqa: PLC0415

    for device in ("cpu", "cuda"):
        wls = models.workloads(torch.device(device), "issue")
        assert [(w.kind, w.batch, w.height, w.width, w.precision) for w in wls] == [
            ("inference", 1, 512, 512, "float32"),
            ("inference", 16, 256, 256, "float32"),
        ]
    with pytest.raises(SystemExit):
        run.parse_args(["--issue-shapes", "--tiny"])
    # The flag reaches the model runner (not run here: minutes on a CPU) and names the file.
    seen = []
    monkeypatch.setattr(models, "run_models", lambda device, size, *a, **k: seen.append(size) or {})
    argv = ["--suite", "models", "--issue-shapes", "--threads", "1", "--output", str(tmp_path)]
    assert run.main(argv) == 0
    assert seen == ["issue"]
    (result,) = tmp_path.glob("*.json")
    assert "-issue" in result.name and json.loads(result.read_text())["size"] == "issue"


def test_model_providers_on_the_cpu():
    model = models.ModelBench(torch.device("cpu"), {}, overrides=models.TINY_OVERRIDES).base
    providers, unavailable = models.model_providers(model, torch.device("cpu"))
    assert providers[:2] == ["reference", "auto"]
    assert "triton" not in providers and "GPU" in unavailable["triton"]
    assert "cuda" not in providers
    assert all(m.backend == "reference" for m in model.modules() if hasattr(m, "backend"))
    for tuned in (models.GRAPHED_TUNED_PROVIDER, models.AUTO_TUNED_PROVIDER):
        assert tuned not in providers and "GPU only" in unavailable[tuned]


def test_benchmark_mode_is_set_for_tuned_providers_only_and_reports_their_choices(monkeypatch):
    from moceir.layers import tuning  # noqa: PLC0415

    saved = torch.backends.cudnn.benchmark
    assert models._backend_of(models.GRAPHED_TUNED_PROVIDER) == "auto"
    assert models.is_graphed(models.GRAPHED_TUNED_PROVIDER) and not models.is_graphed("auto-tuned")
    with models.benchmark_mode("auto") as report:
        assert torch.backends.cudnn.benchmark == saved
    assert report == {}
    with models.benchmark_mode(models.AUTO_TUNED_PROVIDER) as report:
        assert torch.backends.cudnn.benchmark
        # what the layers would record: two 1x1 shapes (one each way), one depthwise shape
        monkeypatch.setitem(tuning._CHOICES, ("pointwise", 1), "kernel")
        monkeypatch.setitem(tuning._CHOICES, ("pointwise", 2), "cudnn")
        monkeypatch.setitem(tuning._CHOICES, ("depthwise", 1), "kernel")
    assert torch.backends.cudnn.benchmark == saved
    assert report == {"pointwise": {"kernel": 1, "cudnn": 1}, "depthwise": {"kernel": 1}}
    assert tuning.choices() == {}


def test_a_provider_without_backward_still_gets_its_forward_timed(monkeypatch):
    """A fast forward whose output carries no autograd graph: forward timed, the rest errors."""
    dispatch_module = sys.modules["moce_kernels.dispatch"]
    monkeypatch.setattr(ops, "op_providers", lambda op, device: (["reference", "cpu"], {}))
    monkeypatch.setattr(
        dispatch_module,
        "resolve_backend",
        lambda op, backend, device: "reference" if backend == "reference" else "cpu",
    )
    monkeypatch.setattr(
        dispatch_module,
        "implementation",
        lambda op, backend: lambda x, plan: dispatch_module.dispatch_reference(x, plan).detach(),
    )
    monkeypatch.setattr(ops, "measure", lambda fn, device, **kw: common.Timing(1.0, 1.0, 1.0, 1))
    rows: list[dict] = []
    ceil = {"copy_gb_per_s": 10.0, "matmul_tflops": {}}
    ops.run_op("dispatch", torch.device("cpu"), [torch.float32], "tiny", ceil, rows.append, common.Deadline())
    by_mode = {r["mode"]: r for r in rows if r["provider"] == "cpu"}
    assert by_mode["forward"]["status"] == "ok" and by_mode["forward"]["rel_err"] == 0
    for mode in ("backward", "full"):
        assert by_mode[mode]["status"] == "error" and "grad" in by_mode[mode]["error"]
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "reference")


def test_profile_step_reports_per_provider_and_refuses_bad_counts(tmp_path, capsys):
    from benchmarks import profile_step  # noqa: PLC0415

    for bad in (["--steps", "0"], ["--top", "0"]):
        with pytest.raises(SystemExit):
            profile_step.main(bad)
        assert "--steps and --top must be >= 1" in capsys.readouterr().err
    providers = "reference,no-such-provider"
    argv = ["--device", "cpu", "--workloads", "adapter,inference", "--providers", providers,
            "--steps", "1", "--top", "3", "--output", str(tmp_path)]  # fmt: skip
    profile_step.main(argv)
    (path,) = tmp_path.glob("profile-cpu-*.json")
    results = json.loads(path.read_text())["results"]
    # In the order --workloads names them (the adapter alone through the benchmarks' own step).
    assert [(r["workload"], r["provider"]) for r in results] == [
        ("adapter", "reference"), ("adapter", "no-such-provider"),
        ("inference", "reference"), ("inference", "no-such-provider"),
    ]  # fmt: skip
    for ok, broken in (results[:2], results[2:]):
        assert ok["wall_ms_per_step"] > 0 and 0 < len(ok["top"]) <= 3
        assert ok["busy_ms_per_step"] > 0 and ok["calls_per_step"] > 0
        assert "error" in broken


def test_adapter_workload_times_one_adapter_of_the_chosen_level():
    bench = models.ModelBench(torch.device("cpu"), {}, overrides=models.TINY_OVERRIDES)
    dim = models.TINY_OVERRIDES["dim"]
    for level, width, side in [(1, 4 * dim, 8), (3, dim, 32)]:
        wl = models.Workload("adapter", 2, 32, 32, "float32", level=level)
        index, (x, freq_emb, shared) = bench.adapter_inputs(wl)
        assert x.shape == shared.shape == (2, width, side, side) and freq_emb.shape[0] == 2
        assert wl.case == f"b2.32x32.level{level}"
        model, step = bench._adapter_fn(wl, "reference")
        grads = step()
        adapter = model.adapters()[index]
        assert len(grads) == 2 + len(list(adapter.parameters()))
        assert grads[0].shape == x.shape and grads[1].shape == shared.shape
        assert all(torch.isfinite(g).all() for g in grads if g is not None)
        assert grads[0].abs().sum() > 0  # the loss reaches the adapter's input
    with pytest.raises(ValueError, match="level must be 1..3"):
        bench.adapter_inputs(models.Workload("adapter", 1, 32, 32, "float32", level=4))


def test_graphed_provider_skips_the_adapter_alone(monkeypatch):
    providers = ["reference", models.GRAPHED_PROVIDER]
    monkeypatch.setattr(models, "model_providers", lambda model, device: (providers, {}))
    rows: list[dict] = []
    models.run_models(torch.device("cpu"), "tiny", {}, rows.append, common.Deadline(), kinds=("adapter",),
                      min_time_s=0.01, min_samples=1)  # fmt: skip
    by_provider = {r["provider"]: r for r in rows}
    assert by_provider["reference"]["status"] == "ok" and by_provider["reference"]["workload"] == "adapter"
    assert by_provider[models.GRAPHED_PROVIDER]["status"] == "skipped"
    assert "not one adapter" in by_provider[models.GRAPHED_PROVIDER]["error"]


def _dying_job(conn, settings, wl, provider):  # a job whose process ends without a word, as a crash
    import os  # noqa: PLC0415

    os._exit(3)  # not os.abort(): no core file on machines that keep them


def _sleeping_job(conn, settings, wl, provider):
    import time  # noqa: PLC0415

    time.sleep(60)


def test_an_isolated_job_returns_its_row_or_says_how_it_failed():
    """Compiled jobs on a GPU run in a process of their own: a crash there (an H100 run aborted
    inside Inductor) costs one row, not the rest of the run."""
    settings = {"device": "cpu", "ceil": {}, "min_time_s": 0.01, "min_samples": 1,
                "overrides": models.TINY_OVERRIDES}  # fmt: skip
    wl = models.Workload("adapter", 1, 32, 32, "float32", level=1)
    # Generous limits (each call returns when its process is done): a spawned process imports
    # torch and the benchmarks first, which takes long on a loaded 2-core machine.
    row = models.run_isolated(settings, wl, "reference", timeout_s=600)
    assert row["median_ms"] > 0 and row["samples"] >= 1
    with pytest.raises(RuntimeError, match="ValueError: level must be 1..3"):
        bad = models.Workload("adapter", 1, 32, 32, "float32", level=7)
        models.run_isolated(settings, bad, "reference", 600)
    # A crash reads as one, never as a timeout (the pipe closes before the process is reaped).
    for _ in range(3):
        with pytest.raises(RuntimeError, match="process died .exit code 3"):
            models.run_isolated(settings, wl, "reference", 600, target=_dying_job)
    with pytest.raises(RuntimeError, match="timed out after 2 s"):
        models.run_isolated(settings, wl, "reference", 2, target=_sleeping_job)
