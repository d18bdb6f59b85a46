"""PSNR/SSIM as the paper computes them; the test sets as the official script builds them."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from moceir.data.benchmarks import Benchmark, crop_to_multiple, official_noise
from moceir.evaluate import psnr, ssim
from moceir.images import read_image
from tests.cli.conftest import write_official_layout


def pair(seed: int = 0, h: int = 32, w: int = 40):
    rng = np.random.default_rng(seed)
    clean = rng.random((h, w, 3)).astype(np.float32)
    restored = (clean + 0.05 * rng.standard_normal(clean.shape)).astype(np.float32)
    return clean, restored


def test_psnr_is_skimage_on_the_clamped_output():
    clean, restored = pair()
    assert restored.min() < 0 and restored.max() > 1  # the clamp matters for this pair
    expected = peak_signal_noise_ratio(clean, np.clip(restored, 0, 1), data_range=1.0)
    assert psnr(clean, restored) == pytest.approx(expected, abs=1e-9)
    mse = np.mean((clean.astype(np.float64) - np.clip(restored, 0, 1)) ** 2)
    assert psnr(clean, restored) == pytest.approx(10 * np.log10(1 / mse), rel=1e-6)


def test_ssim_is_gaussian_weighted_skimage():
    clean, restored = pair(1)
    expected = structural_similarity(
        clean, np.clip(restored, 0, 1), channel_axis=2, gaussian_weights=True, data_range=1.0
    )
    assert ssim(clean, restored) == pytest.approx(expected, abs=1e-9)
    uniform = structural_similarity(clean, np.clip(restored, 0, 1), channel_axis=2, data_range=1.0)
    assert abs(ssim(clean, restored) - uniform) > 1e-4, "the Gaussian window is what is used"
    assert ssim(clean, clean) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "h,w,base,expected", [(481, 321, 16, (480, 320)), (33, 40, 16, (32, 32)), (20, 20, 1, (20, 20))]
)
def test_crop_to_multiple_is_the_official_centre_crop(h, w, base, expected):
    x = np.arange(h * w).reshape(h, w, 1)
    out = crop_to_multiple(x, base)
    assert out.shape[:2] == expected
    ch, cw = h % base if base > 1 else 0, w % base if base > 1 else 0
    assert out[0, 0, 0] == x[ch // 2, cw // 2, 0]


def test_denoise_benchmark_reproduces_the_official_noise(tmp_path):
    root = write_official_layout(tmp_path, n=3, size=(35, 37))
    bench = Benchmark("denoise_25", root, crop_multiple=16)
    # the official script: np.random.seed(0) once, then per image in sorted order
    rng = np.random.RandomState(0)
    expected = []
    for p in sorted((root / "denoising/cBSD68/original_png").glob("*.png")):
        clean = np.round(read_image(p).rgb * 255).astype(np.uint8)
        clean = crop_to_multiple(clean, 16)
        expected.append(official_noise(clean, 25, rng))
    # random access (out of order) gives the same images as the sequential stream
    for i in (2, 0, 1):
        img = bench[i]
        assert img.degraded.shape == (32, 32, 3)
        np.testing.assert_array_equal(np.round(img.degraded * 255).astype(np.uint8), expected[i])
    assert bench.size(0) == (32, 32)


def test_paired_benchmark_and_limit(tmp_path):
    root = write_official_layout(tmp_path, n=3, size=(20, 24))
    bench = Benchmark("derain", root, crop_multiple=1, limit=2)
    assert len(bench) == 2
    img = bench[1]
    assert img.name == "rain-002" and img.degraded.shape == img.clean.shape == (20, 24, 3)
    assert Benchmark("gopro", root).task == "deblur"
