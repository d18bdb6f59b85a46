"""``moceir test``: the table matches metrics computed independently; layout errors are clear."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import moceir
from moceir.cli import build_parser, main
from moceir.data.benchmarks import Benchmark
from tests.cli.conftest import write_official_layout


def test_test_command_matches_skimage_on_the_model_outputs(official_data, tiny_checkpoint, tmp_path, capsys):
    res = tmp_path / "res"
    outs = tmp_path / "outs"
    benches = ["denoise_25", "derain", "dehaze", "lowlight", "cdd11"]
    code = main(
        [
            "test",
            "--checkpoint",
            str(tiny_checkpoint),
            "--data",
            str(official_data),
            "--benchmarks",
            *benches,
            "--results",
            str(res),
            "--save-outputs",
            str(outs),
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads(res.with_suffix(".json").read_text())
    rows = results["images"]
    assert {r["benchmark"] for r in rows} == {"denoise_25", "derain", "dehaze", "lowlight", "cdd11"}
    # independent computation: the model on each degraded image, skimage on the clamped output
    model = moceir.load_checkpoint(tiny_checkpoint).eval()
    for name in ("denoise_25", "derain", "cdd11"):
        bench = Benchmark(name, official_data, crop_multiple=16)
        mine = [r for r in rows if r["benchmark"] == name]
        assert len(mine) == len(bench)
        for i in range(len(bench)):
            im = bench[i]
            with torch.inference_mode():
                y = (
                    model(torch.from_numpy(im.degraded).permute(2, 0, 1)[None])
                    .clamp(0, 1)[0]
                    .permute(1, 2, 0)
                    .numpy()
                )
            row = next(r for r in mine if r["image"] == im.name and r["subset"] == im.subset)
            assert row["psnr"] == pytest.approx(
                peak_signal_noise_ratio(im.clean, y, data_range=1.0), abs=1e-4
            )
            ssim = structural_similarity(im.clean, y, channel_axis=2, gaussian_weights=True, data_range=1.0)
            assert row["ssim"] == pytest.approx(ssim, abs=1e-5)
    summary = {t["benchmark"]: t for t in results["summary"]}
    assert {"cdd11/haze", "cdd11/low_rain", "cdd11/all"} <= set(summary)
    derain = [r["psnr"] for r in rows if r["benchmark"] == "derain"]
    assert summary["derain"]["psnr"] == pytest.approx(np.mean(derain))
    for name in ("denoise_25", "derain", "cdd11/all"):
        assert name in printed
    assert (outs / "derain" / "rain-001.png").is_file() and (outs / "cdd11" / "haze" / "0.png").is_file()
    assert res.with_suffix(".csv").read_text().startswith("benchmark,images,psnr,ssim")


@pytest.mark.parametrize(
    "benchmark,folder",
    [
        ("derain", "deraining/Rain100L"),
        ("dehaze", "dehazing/SOTS/outdoor/hazy"),
        ("deblur", "deblurring/GoPro/test"),
        ("lowlight", "llie/LOLv1/Test"),
        ("denoise_50", "denoising/cBSD68/original_png"),
        ("cdd11", "cdd11/test/clear"),
    ],
)
def test_missing_benchmark_folder_names_it(tmp_path, tiny_checkpoint, capsys, benchmark, folder):
    (tmp_path / "deraining").mkdir()
    code = main(
        ["test", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path), "--benchmarks", benchmark]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "folder not found" in err and folder in err and "expected layout" in err


def test_help_documents_the_layouts_and_every_subcommand(capsys):
    parser = build_parser()
    for cmd in ("restore", "test", "train", "demo", "bench", "info"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    folders = (
        "deraining/Rain100L/rainy dehazing/SOTS/outdoor/hazy llie/LOLv1/Test/input "
        "deblurring/GoPro/test/input denoising/cBSD68/original_png deraining/RainTrainL/rainy "
        "dehazing/RESIDE/part1 denoising/BSD400 cdd11/train/clear"
    )
    for folder in folders.split():
        assert folder in out


def test_a_broken_benchmark_image_is_named(tmp_path, tiny_checkpoint, capsys):
    root = write_official_layout(tmp_path / "data", n=2)
    broken = root / "deraining/Rain100L/rainy/rain-002.png"
    broken.write_bytes(broken.read_bytes()[:100])
    args = [
        "test",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(root),
        "--benchmarks",
        "derain",
        "--quiet",
    ]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "rain-002.png" in err and "Traceback" not in err
