"""Test sets as the paper evaluates them (official layouts, see ``layouts.TEST_LAYOUTS``).

Images are centre-cropped to a multiple of ``crop_multiple`` (16 in the official code; 1 keeps
the full image: our model takes any size). The denoising benchmarks add Gaussian noise to CBSD68
exactly as the official test script does: a ``numpy`` legacy generator seeded with 0, one
``randn`` per image in sorted file order, ``clip(x + sigma n, 0, 255).astype(uint8)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moceir.data.layouts import TEST_LAYOUTS, DatasetLayoutError, Pair, canonical_task, find_pairs
from moceir.images import ImageReadError, image_size, read_image


def crop_to_multiple(image: np.ndarray, base: int) -> np.ndarray:
    """Centre crop H and W down to multiples of ``base`` (the official ``crop_img``)."""
    if base <= 1:
        return image
    h, w = image.shape[:2]
    ch, cw = h % base, w % base
    return image[ch // 2 : h - ch + ch // 2, cw // 2 : w - cw + cw // 2]


def official_noise(clean_uint8: np.ndarray, sigma: float, rng: np.random.RandomState) -> np.ndarray:
    """The official test noise: ``clip(x + randn * sigma, 0, 255).astype(uint8)`` (truncation)."""
    noise = rng.randn(*clean_uint8.shape)
    return np.clip(clean_uint8 + noise * sigma, 0, 255).astype(np.uint8)


@dataclass
class BenchmarkImage:
    name: str
    subset: str
    degraded: np.ndarray  # float32 [H, W, 3] in 0..1
    clean: np.ndarray


class Benchmark:
    """The image pairs of one benchmark, loaded lazily by index."""

    def __init__(
        self, task: str, root: str | Path, crop_multiple: int = 16, limit: int | None = None
    ) -> None:
        self.task = canonical_task(task)
        self.root = Path(root)
        self.crop_multiple = crop_multiple
        self.pairs: list[Pair] = find_pairs(TEST_LAYOUTS[self.task], self.root)[:limit]
        self.sigma = int(self.task.split("_")[1]) if self.task.startswith("denoise_") else None
        self._noisy: dict[int, np.ndarray] = {}
        self._rng = np.random.RandomState(0)

    def __len__(self) -> int:
        return len(self.pairs)

    def size(self, i: int) -> tuple[int, int]:
        """(H, W) of image ``i`` after the crop, from the file header."""
        p = self.pairs[i]
        path = p.degraded or p.clean
        try:
            h, w = image_size(path)
        except ImageReadError as e:
            raise DatasetLayoutError(f"{self.task}: {path}: {e}") from e
        m = max(self.crop_multiple, 1)
        return h - h % m, w - w % m

    def _read_uint8(self, path: Path) -> np.ndarray:
        try:
            rgb = read_image(path).rgb
        except ImageReadError as e:
            raise DatasetLayoutError(f"{self.task}: {path}: {e}") from e
        return crop_to_multiple(np.round(rgb * 255).astype(np.uint8), self.crop_multiple)

    def __getitem__(self, i: int) -> BenchmarkImage:
        p = self.pairs[i]
        clean = self._read_uint8(p.clean)
        if self.sigma is not None:
            # The noise stream is sequential in file order: draw it for every earlier image first.
            for j in range(len(self._noisy), i + 1):
                cj = clean if j == i else self._read_uint8(self.pairs[j].clean)
                self._noisy[j] = official_noise(cj, self.sigma, self._rng)
            degraded = self._noisy[i]
        else:
            degraded = self._read_uint8(p.degraded)
        if degraded.shape != clean.shape:
            raise DatasetLayoutError(
                f"{self.task}: {p.degraded} and {p.clean} differ in size: {degraded.shape} vs {clean.shape}"
            )
        return BenchmarkImage(
            p.name, p.subset, degraded.astype(np.float32) / 255, clean.astype(np.float32) / 255
        )
