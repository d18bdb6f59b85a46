"""benchmarks/report.py on a small fixture run (data/run_gpu.json) and variants of it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks import report

FIXTURE = Path(__file__).parent / "data" / "run_gpu.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fixture_run() -> dict:
    return json.loads(FIXTURE.read_text())


def write_run(folder: Path, name: str, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def table_row(text: str, *cells: str) -> str:
    """The one markdown table line that holds every one of ``cells``."""
    hits = [line for line in text.splitlines() if line.startswith("|") and all(c in line for c in cells)]
    assert len(hits) == 1, f"expected one row with {cells}, got {hits}"
    return hits[0]


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[str, Path]:
    results = tmp_path / "results"
    write_run(results, "cuda-run.json", fixture_run())
    out = tmp_path / "RESULTS.md"
    assert (
        report.main(["--results", str(results), "--output", str(out), "--plots", str(tmp_path / "plots")])
        == 0
    )
    return out.read_text(), tmp_path


def test_run_header_names_device_versions_commit_and_ceilings(rendered):
    text, _ = rendered
    assert "## NVIDIA H100 80GB HBM3 (cuda)" in text
    assert "capability 9.0" in text
    assert "torch 2.11.0+cu130, Triton 3.6.0" in text
    assert "commit `0123456789abcdef0123456789abcdef01234567`" in text
    assert "copy 3000.0 GB/s" in text and "bfloat16 790" in text
    assert "incomplete run" not in text


def test_op_table_speedup_roofline_and_flags(rendered):
    text, _ = rendered
    # reference 2.0 ms, triton 0.5 ms, roofline 0.4 ms: 4x faster and at 80% of the roofline.
    row = table_row(text, "dec2.experts_kv7", "forward")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["dec2.experts_kv7", "8x64x128x128", "float32", "forward", "1.2 GB"]
    assert cells[5] == "2.00 ms · 20% roof"
    assert cells[6] == "0.500 ms · **4.00x** · 80% roof"
    assert cells[7] == "error"  # the cuda provider raised
    # A provider whose output differs from the reference beyond bf16 tolerance is flagged.
    ln = table_row(text, "| dec2 |", "bfloat16", "full")
    assert "**4.00x**" in ln and "⚠ err 5.0e-01" in ln and "skipped" in ln
    assert "Not measured: cpu: grouped_dwconv: backend 'cpu' needs cpu tensors" in text


def test_op_summary_geomean(rendered):
    text, _ = rendered
    row = table_row(text, "`grouped_dwconv`", "triton")
    assert "4.00x" in row and "80%" in row


def test_model_tables_against_eager_and_compiled_reference(rendered):
    text, _ = rendered
    train = table_row(text, "b8.128x128", "bf16-autocast", "| auto |")
    cells = [c.strip() for c in train.strip("|").split("|")]
    # auto 50 ms, eager reference 200 ms, compiled reference 100 ms; batch 8 -> 160 images/s.
    assert cells[3:8] == ["50.00 ms", "160.00", "4.00x", "2.00x", "2048"]
    video = table_row(text, "1080x1920", "bfloat16", "| triton |")
    cells = [c.strip() for c in video.strip("|").split("|")]
    assert cells[3:7] == ["100 ms", "10.00", "3.00x", "1.50x"]
    assert cells[8:] == ["100 GB", "30.0", "33%"]
    ref = table_row(text, "1080x1920", "bfloat16", "| reference |")
    assert "317 GB" in ref and "9.5" in ref
    # The skipped workload shows as skipped, not as a number.
    assert "skipped" in table_row(text, "b1.512x512", "reference")
    assert "Not measured: cpu: RuntimeError: needs cpu tensors" in text


def test_video_breakdown_table(rendered):
    text, _ = rendered
    assert "Where the time goes, 1080x1920 bfloat16" in text
    row = table_row(text, "| conv 1x1 |")
    assert "120 ms (40%)" in row
    assert "300 ms" in table_row(text, "total (one timed call)")


def test_plots_are_pngs_linked_from_the_report(rendered):
    text, tmp_path = rendered
    for suite in ("ops", "models"):
        png = tmp_path / "plots" / f"cuda-nvidia-h100-80gb-hbm3-{suite}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{png.name})" in text


def test_latest_real_run_per_device_wins(tmp_path: Path):
    results = tmp_path / "results"
    newer = fixture_run()
    older = copy.deepcopy(newer)
    older["environment"]["date"] = "2026-11-01T00:00:00+00:00"
    older["environment"]["commit"] = "old0000000000"
    for row in older["results"]:
        if row.get("median_ms"):
            row["median_ms"] *= 10
    tiny = copy.deepcopy(newer)
    tiny["environment"]["date"] = "2026-12-01T00:00:00+00:00"
    tiny["environment"]["commit"] = "tiny000000000"
    tiny["size"] = "tiny"
    write_run(results, "a-older.json", older)
    write_run(results, "b-newer.json", newer)
    write_run(results, "c-tiny.json", tiny)
    text = report.render(report.load_runs(results), None, tmp_path)
    main_part, runs_part = text.split("## Every run")
    assert "Run `b-newer.json`" in main_part
    assert "a-older.json" not in main_part and "c-tiny.json" not in main_part
    for name in ("a-older.json", "b-newer.json", "c-tiny.json"):
        assert name in runs_part


def test_other_device_gets_its_own_section_and_incomplete_is_said(tmp_path: Path):
    results = tmp_path / "results"
    cpu = fixture_run()
    cpu["environment"] |= {"device": "AMD EPYC", "device_type": "cpu", "loadavg": [1.5, 1.0, 0.5]}
    cpu["complete"] = False
    cpu["results"] = [r for r in cpu["results"] if r["suite"] == "ops" and r["provider"] == "reference"]
    write_run(results, "cpu.json", cpu)
    write_run(results, "gpu.json", fixture_run())
    text = report.render(report.load_runs(results), None, tmp_path)
    assert "## AMD EPYC (cpu)" in text and "## NVIDIA H100 80GB HBM3 (cuda)" in text
    assert "load average at start 1.5" in text
    assert "incomplete run" in text
    assert "reference only" in text


def test_unreadable_files_are_skipped(tmp_path: Path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "broken.json").write_text("{not json")
    (results / "other.json").write_text(json.dumps({"something": 1}))
    assert report.load_runs(results) == []
    err = capsys.readouterr().err
    assert "broken.json" in err and "other.json" in err
    text = report.render([], None, tmp_path)
    assert "No result files yet" in text


def test_summary_table_of_a_device_check(tmp_path: Path):
    write_run(tmp_path / "results", "cuda.json", fixture_run())
    (tmp_path / "stages.tsv").write_text(
        "build\tok\t95\t\ntests-gpu\tok\t40\t\nbench-models\ttimeout (budget)\t200\tstopped\n"
    )
    (tmp_path / "results" / "pytest-tests-gpu.xml").write_text(
        '<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    text = report.summary_table(tmp_path)
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "status", "seconds", "note"]
    assert "7 passed, 1 failed, 0 errors, 2 skipped" in text
    assert "timeout (budget)" in text
    assert "copy 3000 GB/s" in text
    row = next(line for line in lines if line.startswith("grouped_dwconv") and "triton" in line)
    assert "4.00x" in row
    row = next(line for line in lines if line.startswith("training") and " auto " in line)
    assert "4.00x" in row and "2.00x" in row


def test_a_partial_rerun_adds_to_the_earlier_run(tmp_path: Path):
    """A newer run of one op shows that op; the other ops still come from the older full run."""
    old = fixture_run()
    new = copy.deepcopy(old)
    new["environment"]["date"] = "2099-01-01T00:00:00+00:00"
    new["environment"]["commit"] = "f" * 40
    ops = sorted({r["op"] for r in old["results"] if r.get("suite") == "ops"})
    rerun = ops[0]
    new["results"] = [r for r in new["results"] if r.get("op") == rerun]
    write_run(tmp_path / "results", "old.json", old)
    write_run(tmp_path / "results", "new.json", new)
    runs = report.load_runs(tmp_path / "results")
    shown = report.runs_by_device(runs)[runs[0].device_key]["ops"]
    assert [r.path.name for r in shown] == ["new.json", "old.json"]
    assert {r["op"] for r in shown[0].suite_rows("ops")} == {rerun}
    assert {r["op"] for r in shown[1].suite_rows("ops")} == set(ops) - {rerun}
    text = report.render(runs, None, tmp_path)
    assert "`new.json`" in text and "`old.json`" in text


@pytest.mark.parametrize(
    ("provider", "row", "shown"),
    [
        pytest.param("auto", {"peak_bytes": 3 * 2**20}, "3", id="eager-peak"),
        pytest.param(
            "graphed-auto", {"peak_bytes": 5 * 2**20, "peak_kind": "reserved"}, "5", id="graph-pool"
        ),
        pytest.param("graphed-auto", {"peak_bytes": 5 * 2**20}, "n/c", id="graph-replay-only"),
        pytest.param("graphed-auto", {"peak_bytes": None}, "–", id="graph-cpu"),
    ],
)
def test_a_graph_peak_that_left_out_its_pool_is_not_compared(provider: str, row: dict, shown: str):
    assert report._peak_mib(provider, row) == shown


def test_benchmark_mode_choices_are_listed_per_row():
    groups = {
        ("b1.512x512", "bfloat16", None): {
            "reference": {"status": "ok"},
            "graphed-auto-tuned": {
                "status": "ok",
                "tuned_choices": {"pointwise": {"kernel": 7, "cudnn": 3}, "depthwise": {"triton": 2}},
            },
        }
    }
    lines = report.tuned_notes(groups)
    assert lines[0] == "Benchmark-mode choices:"
    assert lines[2] == (
        "- graphed-auto-tuned, b1.512x512 bfloat16: shapes per choice, "
        "depthwise: ours (Triton) 2; 1x1: cuDNN 3, ours 7"
    )
    assert report.tuned_notes({("c", "p", None): {"auto": {"status": "ok"}}}) == []


def test_benchmark_mode_candidate_times_are_listed_under_their_row():
    groups = {
        ("b16.256x256", "bfloat16", None): {
            "graphed-auto-tuned": {
                "status": "ok",
                "tuned_choices": {
                    "pointwise": {"cublas": 2},
                    "ms": {"pointwise": {"cudnn": 1.5, "kernel": 2.25, "cublas": 0.75}},
                },
            }
        }
    }
    lines = report.tuned_notes(groups)
    assert lines[2] == "- graphed-auto-tuned, b16.256x256 bfloat16: shapes per choice, 1x1: cuBLAS GEMM 2"
    assert lines[3] == (
        "  - 1x1, every candidate timed on every shape: cuBLAS GEMM 0.750 ms, cuDNN 1.500 ms, ours 2.250 ms"
    )
