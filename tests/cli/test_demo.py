"""``moceir demo --quick``: the whole demo on a tiny network in seconds."""

from __future__ import annotations

import json

from PIL import Image

import moceir
from moceir.cli import main
from moceir.demo import DEMO_TASKS


def test_quick_demo_trains_restores_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for task in DEMO_TASKS:
        assert task in printed
    assert "trained 4 steps" in printed and "reference" in printed and "dec0:" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == set(DEMO_TASKS)
    for r in report["tasks"].values():
        assert r["psnr_in"] > 0 and r["psnr_out"] > 0
        assert len(r["experts"]) == len(report["decoder_blocks"]) == 3
        assert all(0 <= e[0] < 4 for e in r["experts"])
    assert report["backend_seconds"]["reference"] > 0
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 3 * 32 and grid.height > len(DEMO_TASKS) * 24
    assert (out / "routing.png").stat().st_size > 1000
    model = moceir.load_checkpoint(out / "model.safetensors")  # the trained weights reload
    assert model.config.dim == 8


def test_demo_with_a_checkpoint_skips_training(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--quick",
            "--checkpoint",
            str(tiny_checkpoint),
            "--output-dir",
            str(out),
            "--tasks",
            "denoise_50",
            "dehaze",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "no training" in printed and "training MoCE-IR-S" not in printed
    assert set(json.loads((out / "report.json").read_text())["tasks"]) == {"denoise_50", "dehaze"}
    assert not (out / "model.safetensors").exists()


def test_budget_mode_stops_on_time(tmp_path, capsys):
    out = tmp_path / "demo"
    args = "demo --quick --budget 1.5 --tasks denoise_15 --quiet --output-dir".split()
    assert main([*args, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "budget 2 s" in printed and "trained" in printed
