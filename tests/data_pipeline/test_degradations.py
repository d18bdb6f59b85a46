"""The synthetic degradations do what their names say, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from moceir.data import degradations as D


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.3 * np.sin(5 * xx + c) * np.cos(3 * yy - c) for c in range(3)], axis=2)
    return (img + 0.02 * rng.standard_normal(img.shape)).clip(0, 1).astype(np.float32)


@pytest.mark.parametrize("task", sorted(D.SYNTHETIC_TASKS), ids=str)
def test_every_task_is_reproducible_in_range_and_changes_the_image(task):
    img = photo()
    a = D.degrade(task, img, np.random.default_rng(3))
    b = D.degrade(task, img, np.random.default_rng(3))
    c = D.degrade(task, img, np.random.default_rng(4))
    assert a.shape == img.shape and a.dtype == np.float32
    assert np.array_equal(a, b), "same seed, same degradation"
    assert not np.array_equal(a, c), "another seed, another degradation"
    assert a.min() >= 0 and a.max() <= 1
    assert np.abs(a - img).mean() > 0.005


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_gaussian_noise_matches_the_official_formula(sigma):
    img = photo()
    rng = np.random.default_rng(0)
    out = D.gaussian_noise(img, sigma, np.random.default_rng(0))
    expected = np.clip(img.astype(np.float64) * 255 + rng.standard_normal(img.shape) * sigma, 0, 255).astype(
        np.uint8
    )
    np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), expected)


def test_gaussian_noise_has_the_requested_std_away_from_the_clip():
    img = np.full((200, 200, 3), 0.5, np.float32)
    out = D.gaussian_noise(img, 25, np.random.default_rng(0), quantize=False)
    assert abs((out - img).std() * 255 - 25) < 0.5


def test_haze_is_the_atmospheric_scattering_model():
    img = photo()
    depth = np.linspace(0.2, 1.0, img.shape[0], dtype=np.float32)[:, None].repeat(img.shape[1], 1)
    out = D.haze(img, np.random.default_rng(0), beta=1.2, airlight=0.9, depth=depth)
    t = np.exp(-1.2 * depth)[..., None]
    np.testing.assert_allclose(out, img * t + 0.9 * (1 - t), atol=1e-6)
    # the far (bottom, depth 1) rows are closer to the airlight than the near (top) rows
    assert np.abs(out[-1] - 0.9).mean() < np.abs(out[0] - 0.9).mean()
    # the synthetic depth: top far, bottom near, within 0.2..1
    d = D.synthetic_depth((40, 30), np.random.default_rng(0))
    assert d.min() >= 0.2 - 1e-6 and d.max() <= 1.0 + 1e-6 and d[:5].mean() > d[-5:].mean()


def test_low_light_darkens():
    img = photo()
    out = D.low_light(img, np.random.default_rng(0))
    assert out.mean() < 0.5 * img.mean()


def test_blur_keeps_the_mean_and_removes_high_frequencies():
    img = photo()
    out = D.motion_blur(img, np.random.default_rng(0), length=7, angle=30.0)
    assert abs(out.mean() - img.mean()) < 0.01
    lap = lambda x: np.abs(ndimage.laplace(x.mean(2))).mean()  # noqa: E731
    assert lap(out) < 0.5 * lap(img)


@pytest.mark.parametrize("length,angle", [(1, 0.0), (5, 0.0), (9, 45.0), (12, 90.0), (7, -20.0)])
def test_line_kernel_is_normalised_and_oriented(length, angle):
    k = D.line_kernel(length, angle)
    assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-5)
    if length > 3 and angle == 0.0:  # vertical: all weight in the central column(s)
        c = k.shape[1] // 2
        assert k[:, c].sum() > 0.9


@pytest.mark.parametrize("angle,along", [(0.0, 0), (90.0, 1)], ids=["vertical", "horizontal"])
def test_rain_adds_bright_streaks_along_the_angle(angle, along):
    img = np.full((64, 64, 3), 0.3, np.float32)
    out = D.rain_streaks(img, np.random.default_rng(0), density=0.005, length=9, angle=angle, intensity=0.8)
    assert np.all(out >= img - 1e-6), "rain only brightens (screen blend)"
    streak = (out - img).mean(2) > 0.2
    # bright pixels touch their neighbours along the streak direction far more than across it
    runs = [(streak[1:] & streak[:-1]).sum(), (streak[:, 1:] & streak[:, :-1]).sum()]
    assert runs[along] > 5 * runs[1 - along]


def test_unknown_task_and_bad_shape_raise():
    with pytest.raises(ValueError, match="no synthetic degradation"):
        D.degrade("cdd11", photo(), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        D.haze(np.zeros((8, 8), np.float32), np.random.default_rng(0))
