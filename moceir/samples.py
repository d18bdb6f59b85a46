"""Sample images that need no download.

- :func:`demo_photos`: colour photographs bundled with scikit-image, for the demo's training and
  held-out sets.
- The PNGs under ``moceir/assets/samples`` (written by :func:`write_samples`, deterministic):
  three degraded crops and their clean versions, to try ``moceir restore`` on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moceir.data.degradations import gaussian_blur, gaussian_noise

SAMPLES_DIR = Path(__file__).parent / "assets" / "samples"
#: H x W of every bundled sample: not a multiple of 8, so restoring them exercises padding.
SAMPLE_SIZE = (150, 230)

#: scikit-image loaders of colour photographs (all bundled with the package, no download).
TRAIN_PHOTOS = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "motorcycle")
HELD_OUT_PHOTOS = ("chelsea", "coffee")


def _load_photo(name: str) -> np.ndarray:
    import skimage.data  # noqa: PLC0415

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def demo_photos(names: tuple[str, ...], longest_side: int = 256) -> dict[str, np.ndarray]:
    """uint8 [H, W, 3] photographs, downscaled (area filter) so the longest side is at most
    ``longest_side`` (small images: more structure per training crop)."""
    out = {}
    for name in names:
        im = Image.fromarray(_load_photo(name)[..., :3])
        scale = longest_side / max(im.size)
        if scale < 1:
            im = im.resize(
                (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BOX
            )
        out[name] = np.asarray(im)
    return out


def darken(image: np.ndarray, gain: float = 0.35, gamma: float = 1.6) -> np.ndarray:
    """Low light without noise (the bundled sample)."""
    return np.clip(gain * image**gamma, 0.0, 1.0)


def _crop(image: np.ndarray, top: int, left: int) -> np.ndarray:
    h, w = SAMPLE_SIZE
    return image[top : top + h, left : left + w].astype(np.float32) / 255.0


def write_samples(folder: Path = SAMPLES_DIR) -> list[Path]:
    """Write ``<name>_clean.png`` and ``<name>_<degradation>.png`` for three photographs."""
    import skimage.data  # noqa: PLC0415

    rng = np.random.default_rng(0)
    clean = {
        "astronaut": _crop(skimage.data.astronaut(), 30, 150),
        "chelsea": _crop(skimage.data.chelsea(), 60, 120),
        "coffee": _crop(skimage.data.coffee(), 120, 200),
    }
    degraded = {
        "astronaut_noise25": gaussian_noise(clean["astronaut"], 25, rng, quantize=False),
        "chelsea_blur": gaussian_blur(clean["chelsea"], 2.0),
        "coffee_lowlight": darken(clean["coffee"]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, img in [*((f"{k}_clean", v) for k, v in clean.items()), *degraded.items()]:
        path = folder / f"{name}.png"
        Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        written.append(path)
    return written


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
