"""benchmarks/device_check.sh: argument handling, the dry run end to end, and its time budget."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
STAGES = [
    "preflight",
    "build",
    "tests-gpu",
    "profile",
    "bench-ops",
    "bench-models",
    "sanitizer",
    "tests-other",
    "report",
]

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout"
)


def run_script(*args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHON": sys.executable}
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    return done, time.monotonic() - start


def stages(outdir: Path) -> dict[str, list[str]]:
    lines = (outdir / "stages.tsv").read_text().splitlines()
    return {line.split("\t")[0]: line.split("\t")[1:] for line in lines}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "OUTDIR is required", id="no-outdir"),
        pytest.param(
            ["{out}", "--budget", "abc"], "--budget must be a whole number", id="budget-not-a-number"
        ),
        pytest.param(["{out}", "--budget", "0"], "--budget must be a whole number", id="budget-zero"),
        pytest.param(["{out}", "--budget"], "--budget needs", id="budget-missing-value"),
        pytest.param(["{out}", "--tests"], "--tests needs a value", id="tests-missing-value"),
        pytest.param(["{out}", "--ops"], "--ops needs a value", id="ops-missing-value"),
        pytest.param(["{out}", "--workloads"], "--workloads needs a value", id="workloads-missing-value"),
        pytest.param(["{out}", "--frobnicate"], "unknown option '--frobnicate'", id="unknown-option"),
        pytest.param(["{out}", "{out}2"], "one OUTDIR only", id="two-outdirs"),
        pytest.param(["{out}", "--skip", "build,bogus"], "unknown stage 'bogus'", id="unknown-stage"),
        pytest.param(
            ["{out}", "--skip", "preflight"], "unknown stage 'preflight'", id="preflight-not-skippable"
        ),
        pytest.param(["{out}", "--cap", "bogus=3"], "--cap: unknown stage 'bogus'", id="cap-unknown-stage"),
        pytest.param(["{out}", "--cap", "build=x"], "--cap must be STAGE=SECONDS", id="cap-not-a-number"),
        pytest.param(["{out}", "--cap", "build"], "--cap must be STAGE=SECONDS", id="cap-without-seconds"),
        pytest.param(["{out}", "--cap"], "--cap needs", id="cap-missing-value"),
    ],
)
def test_bad_arguments_exit_2_with_usage(tmp_path: Path, args: list[str], message: str):
    done, _ = run_script(*[a.format(out=tmp_path / "out") for a in args], timeout=30)
    assert done.returncode == 2
    assert message in done.stderr
    assert "usage: benchmarks/device_check.sh OUTDIR" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing is written before the arguments are valid


def test_help_describes_every_stage():
    done, _ = run_script("--help", timeout=30)
    assert done.returncode == 0
    for word in ("OUTDIR", "--budget", "--dry-run", "--skip", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", *STAGES):
        assert word in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_and_without_dry_run_it_stops_with_status_3(tmp_path: Path):
    done, _ = run_script(str(tmp_path), "--budget", "60", timeout=120)
    assert done.returncode == 3
    assert "no CUDA GPU" in done.stdout
    assert (tmp_path / "environment.json").exists()


def test_dry_run_end_to_end(tmp_path: Path):
    # Enough for the toy benchmarks on a quiet 2-core machine; on a loaded one the budget cuts
    # the model benchmarks, which is what the budget is for.
    budget = 60
    done, took = run_script(str(tmp_path), "--dry-run", "--budget", str(budget))
    assert done.returncode == 0, done.stdout + done.stderr
    assert took < budget + 10
    status = stages(tmp_path)
    assert list(status) == STAGES
    for stage in ("build", "tests-gpu", "sanitizer", "tests-other"):
        assert status[stage][0] == "skipped (dry run)"
    # What the GPU run would execute: the in-place build for the local GPU only, the op tests
    # and the GPU model tests, compute-sanitizer over the sanitizer workload.
    build = (tmp_path / "logs" / "build.log").read_text()
    assert "FORCE_CUDA=1" in build and "setup.py build_ext --inplace" in build and "MAX_JOBS=" in build
    tests_gpu = (tmp_path / "logs" / "tests-gpu.log").read_text()
    assert "tests/ops" in tests_gpu and "tests/model/test_backends_gpu.py" in tests_gpu
    sanitizer = (tmp_path / "logs" / "sanitizer.log").read_text()
    assert "--tool memcheck" in sanitizer and "benchmarks.sanitizer_workload" in sanitizer
    assert status["preflight"][0] == "ok"
    assert "missing_modules" in json.loads((tmp_path / "environment.json").read_text())
    # The benchmarks ran at toy sizes (or were cut by the budget, which still keeps their rows).
    assert status["bench-ops"][0] in ("ok", "timeout (budget)")
    results = sorted((tmp_path / "results").glob("cpu-*.json"))
    assert results, "no result file written"
    rows = [r for path in results for r in json.loads(path.read_text())["results"]]
    if status["bench-ops"][0] == "ok":  # a loaded machine may spend the budget before any row
        assert {r["op"] for r in rows if r["suite"] == "ops"} >= {"route", "dispatch"}
    assert status["bench-models"][0] in ("ok", "timeout (budget)", "skipped (budget)")
    assert status["report"][0] == "ok"
    assert "# Benchmark results" in (tmp_path / "RESULTS.md").read_text()
    # The closing table comes last, and is kept in the output folder too.
    tail = done.stdout.strip().splitlines()
    table_start = next(i for i, line in enumerate(tail) if line.split()[:2] == ["stage", "status"])
    assert any(line.startswith("bench-ops") for line in tail[table_start:])
    assert (tmp_path / "summary.txt").read_text().strip() == "\n".join(tail[table_start:]).strip()


def test_budget_stops_cleanly_and_still_reports(tmp_path: Path):
    budget = 12
    done, took = run_script(str(tmp_path), "--dry-run", "--budget", str(budget), "--skip", "report")
    assert done.returncode == 0, done.stdout + done.stderr
    # The preflight always runs (a few seconds); nothing else may overrun the budget by much.
    assert took < budget + 15
    status = stages(tmp_path)
    assert list(status) == STAGES
    assert status["report"][0] == "skipped (--skip)"
    cut = [
        s for s in ("bench-ops", "bench-models") if status[s][0] in ("skipped (budget)", "timeout (budget)")
    ]
    assert cut, status
    assert "stage" in done.stdout.strip().splitlines()[-len(STAGES) - 1]


def test_interruptible_restores_sigint_that_a_background_start_ignores():
    """The budget stops pytest and the benchmarks with SIGINT: it must arrive even when the
    script was started in the background (SIGINT ignored on entry, which Python keeps)."""
    command = f"trap '' INT; exec '{sys.executable}' -m benchmarks.interruptible timeit -n 10000000000 pass"
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
