"""Synthetic degradations: make a (degraded, clean) pair from any clean image.

Every function takes a float32 RGB image ``[H, W, 3]`` in 0..1 and a ``numpy.random.Generator``
(all randomness comes from it, so a seed reproduces the pair) and returns a float32 image of the
same shape in 0..1. Parameters left as ``None`` are drawn from ranges that look like the public
benchmarks; sizes (streak and blur lengths) are in pixels, not relative to the image, so a
training crop degraded on its own looks like a piece of a degraded photograph.

- ``gaussian_noise``: additive white Gaussian noise of ``sigma`` on the 0..255 scale, clipped and
  truncated to 8 bits exactly as the official MoCE-IR / PromptIR code does (``denoise_<sigma>``).
- ``rain_streaks``: sparse drops smeared along a slanted line, screen-blended (``derain``).
- ``haze``: the atmospheric scattering model ``I = J t + A (1 - t)``, ``t = exp(-beta d)`` with a
  smooth synthetic depth ``d`` (``dehaze``).
- ``motion_blur`` / ``gaussian_blur``: a random straight-line motion kernel (``deblur``).
- ``low_light``: gain below one, gamma above one, shot and read noise, 8-bit (``lowlight``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

#: Synthetic task name -> generator ``f(image, rng) -> degraded``.
SYNTHETIC_TASKS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {}


def _task(name: str):
    def register(fn):
        SYNTHETIC_TASKS[name] = fn
        return fn

    return register


def _check(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    return image.astype(np.float32, copy=False)


def gaussian_noise(
    image: np.ndarray, sigma: float, rng: np.random.Generator, quantize: bool = True
) -> np.ndarray:
    """``clip(255 x + sigma n, 0, 255)``, truncated to uint8 when ``quantize`` (as the official
    code's ``astype(np.uint8)``), divided by 255."""
    x = _check(image).astype(np.float64) * 255.0
    noisy = np.clip(x + rng.standard_normal(x.shape) * sigma, 0.0, 255.0)
    if quantize:
        noisy = np.floor(noisy)
    return (noisy / 255.0).astype(np.float32)


for _sigma in (15, 25, 50):
    SYNTHETIC_TASKS[f"denoise_{_sigma}"] = lambda image, rng, s=_sigma: gaussian_noise(image, s, rng)


def line_kernel(length: int, angle: float, width: float = 0.0) -> np.ndarray:
    """A normalised ``[k, k]`` kernel: a line of ``length`` pixels at ``angle`` degrees from the
    vertical, optionally widened by a Gaussian of std ``width``."""
    length = max(1, int(length))
    size = length + 2 if length % 2 == 0 else length + 1
    size += 1 - size % 2  # odd
    k = np.zeros((size, size), np.float64)
    c = size // 2
    theta = math.radians(angle)
    # Sample the segment densely and splat with bilinear weights (anti-aliased line).
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length + 1):
        y, x = c + t * math.cos(theta), c + t * math.sin(theta)
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        fy, fx = y - y0, x - x0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
                    k[y0 + dy, x0 + dx] += wy * wx
    if width > 0:
        k = ndimage.gaussian_filter(k, width)
    return (k / k.sum()).astype(np.float32)


def _convolve_rgb(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        out[..., c] = ndimage.convolve(image[..., c], kernel, mode="reflect")
    return out


@_task("derain")
def rain_streaks(
    image: np.ndarray,
    rng: np.random.Generator,
    density: float | None = None,
    length: int | None = None,
    angle: float | None = None,
    intensity: float | None = None,
) -> np.ndarray:
    """Rain: sparse random drops smeared along a line of ``length`` px at ``angle`` degrees,
    scaled to ``intensity`` and screen-blended: ``1 - (1 - x)(1 - rain)``."""
    x = _check(image)
    h, w = x.shape[:2]
    density = rng.uniform(0.004, 0.012) if density is None else density
    # In pixels, not relative to the image: a crop must look like a piece of a degraded image.
    length = int(rng.integers(8, 25)) if length is None else length
    angle = rng.uniform(-25.0, 25.0) if angle is None else angle
    intensity = rng.uniform(0.5, 0.9) if intensity is None else intensity
    drops = (rng.random((h, w)) < density) * rng.uniform(0.6, 1.0, (h, w))
    streaks = ndimage.convolve(drops.astype(np.float32), line_kernel(length, angle, 0.5), mode="wrap")
    # A streak of one drop has a total of one spread over ~length pixels: bring it back to ~1.
    rain = np.clip(streaks * length * intensity, 0.0, 1.0)[..., None]
    return np.clip(1.0 - (1.0 - x) * (1.0 - rain), 0.0, 1.0).astype(np.float32)


def atmospheric_scattering(clean: np.ndarray, transmission: np.ndarray, airlight) -> np.ndarray:
    """``I = J t + A (1 - t)``: ``transmission`` ``[H, W]`` in 0..1, ``airlight`` a scalar or [3]."""
    t = transmission[..., None].astype(np.float32)
    a = np.asarray(airlight, np.float32)
    return np.clip(clean * t + a * (1.0 - t), 0.0, 1.0).astype(np.float32)


def synthetic_depth(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth depth map in 0.2..1: a slanted far-to-near ramp plus low-frequency variation."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tilt = rng.uniform(-0.3, 0.3)
    ramp = 1.0 - yy / max(h - 1, 1) + tilt * (xx / max(w - 1, 1) - 0.5)
    blobs = ndimage.gaussian_filter(
        rng.standard_normal((h, w)).astype(np.float32), max(h, w) / 6, mode="wrap"
    )
    blobs /= np.abs(blobs).max() + 1e-6
    d = ramp + 0.4 * blobs
    d = (d - d.min()) / (d.max() - d.min() + 1e-6)
    return (0.2 + 0.8 * d).astype(np.float32)


@_task("dehaze")
def haze(
    image: np.ndarray,
    rng: np.random.Generator,
    beta: float | None = None,
    airlight: float | np.ndarray | None = None,
    depth: np.ndarray | None = None,
) -> np.ndarray:
    """Haze by the atmospheric scattering model, ``t = exp(-beta depth)``."""
    x = _check(image)
    beta = rng.uniform(0.6, 2.0) if beta is None else beta
    if airlight is None:
        airlight = rng.uniform(0.7, 1.0) + rng.uniform(-0.03, 0.03, 3)
    depth = synthetic_depth(x.shape[:2], rng) if depth is None else depth
    return atmospheric_scattering(x, np.exp(-beta * depth), airlight)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of std ``sigma`` pixels (every channel)."""
    return ndimage.gaussian_filter(_check(image), sigma=(sigma, sigma, 0), mode="reflect").astype(np.float32)


@_task("deblur")
def motion_blur(
    image: np.ndarray, rng: np.random.Generator, length: int | None = None, angle: float | None = None
) -> np.ndarray:
    """Camera-shake blur: a straight motion of ``length`` px at ``angle`` degrees."""
    x = _check(image)
    length = int(rng.integers(5, 16)) if length is None else length
    angle = rng.uniform(0.0, 180.0) if angle is None else angle
    return np.clip(_convolve_rgb(x, line_kernel(length, angle, 0.3)), 0.0, 1.0)


@_task("lowlight")
def low_light(
    image: np.ndarray,
    rng: np.random.Generator,
    gain: float | None = None,
    gamma: float | None = None,
    noise: float | None = None,
) -> np.ndarray:
    """Under-exposure: ``gain * x ** gamma`` plus shot and read noise, truncated to 8 bits."""
    x = _check(image)
    gain = rng.uniform(0.15, 0.45) if gain is None else gain
    gamma = rng.uniform(1.3, 2.2) if gamma is None else gamma
    noise = rng.uniform(0.005, 0.02) if noise is None else noise
    dark = gain * np.power(x, gamma)
    std = np.sqrt(noise**2 + 0.01 * noise * dark)
    noisy = dark + rng.standard_normal(x.shape).astype(np.float32) * std
    return (np.floor(np.clip(noisy, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def degrade(task: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply the synthetic degradation of ``task`` (a key of :data:`SYNTHETIC_TASKS`)."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"no synthetic degradation for task {task!r}; known: {sorted(SYNTHETIC_TASKS)}")
    return SYNTHETIC_TASKS[task](image, rng)
