"""The demo's sample images: scikit-image photographs with synthetic degradations.

The PNGs under ``moceir/assets/samples`` were written by ``write_samples`` (deterministic); they
are bundled so the demo needs no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SAMPLES_DIR = Path(__file__).parent / "assets" / "samples"
#: H x W of every sample: not a multiple of 8, so the demo exercises padding.
SAMPLE_SIZE = (150, 230)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise of ``sigma`` on the 0..255 scale (the denoising task)."""
    return np.clip(image + rng.normal(0.0, sigma / 255.0, image.shape), 0.0, 1.0)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of every channel (a stand-in for the deblurring task)."""
    return gaussian_filter(image, sigma=(sigma, sigma, 0))


def darken(image: np.ndarray, gain: float = 0.35, gamma: float = 1.6) -> np.ndarray:
    """Low light: a gain below one and a gamma above one."""
    return np.clip(gain * image**gamma, 0.0, 1.0)


def _crop(image: np.ndarray, top: int, left: int) -> np.ndarray:
    h, w = SAMPLE_SIZE
    return image[top : top + h, left : left + w].astype(np.float64) / 255.0


def write_samples(folder: Path = SAMPLES_DIR) -> list[Path]:
    """Write ``<name>_clean.png`` and ``<name>_<degradation>.png`` for three photographs."""
    import skimage.data  # noqa: PLC0415  (only needed to regenerate the bundled files)

    rng = np.random.default_rng(0)
    clean = {
        "astronaut": _crop(skimage.data.astronaut(), 30, 150),
        "chelsea": _crop(skimage.data.chelsea(), 60, 120),
        "coffee": _crop(skimage.data.coffee(), 120, 200),
    }
    degraded = {
        "astronaut_noise25": add_noise(clean["astronaut"], 25, rng),
        "chelsea_blur": blur(clean["chelsea"], 2.0),
        "coffee_lowlight": darken(clean["coffee"]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, img in [*((f"{k}_clean", v) for k, v in clean.items()), *degraded.items()]:
        path = folder / f"{name}.png"
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)
        written.append(path)
    return written


def load_image(path: Path) -> np.ndarray:
    """RGB image as float32 [H, W, 3] in 0..1."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def degraded_samples() -> list[tuple[str, Path, Path]]:
    """(name, degraded path, clean path) of each bundled sample."""
    out = []
    for path in sorted(SAMPLES_DIR.glob("*.png")):
        if path.stem.endswith("_clean"):
            continue
        photo = path.stem.split("_")[0]
        out.append((path.stem, path, SAMPLES_DIR / f"{photo}_clean.png"))
    return out


if __name__ == "__main__":
    for p in write_samples():
        print(p)
