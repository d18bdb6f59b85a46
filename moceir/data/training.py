"""Training examples and their deterministic order.

Which image a sample is, where it is cropped, how it is flipped and how it is degraded depend
only on ``(seed, global sample position)``; the position of sample ``j`` of micro-batch ``a`` of
rank ``r`` at optimiser step ``s`` is ``s * G + (a * world + r) * batch + j`` with
``G = batch * accumulation * world`` the global batch. Hence: resuming at step ``s`` continues the
exact data stream, and ``world`` processes with ``accumulation`` micro-batches each see the same
samples as one process with ``world * accumulation`` micro-batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moceir.data.degradations import SYNTHETIC_TASKS, degrade
from moceir.data.layouts import (
    DEFAULT_REPEATS,
    TRAIN_LAYOUTS,
    DatasetLayoutError,
    canonical_task,
    find_pairs,
    is_official_root,
)
from moceir.images import IMAGE_EXTENSIONS, ImageReadError, read_image

#: An image on disk, or in memory (uint8 or float [H, W, 3]).
Source = Path | np.ndarray


@dataclass(frozen=True, eq=False)
class TrainItem:
    """One training example: a clean image and its degraded version (None: synthesised)."""

    task: str
    clean: Source
    degraded: Source | None = None


def clean_folder_images(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def training_items(
    data: str | Path, tasks: list[str], repeats: dict[str, int] | None = None
) -> tuple[list[TrainItem], str]:
    """The training examples of ``tasks`` under ``data``, each task repeated as the recipe says.

    ``data`` laid out as the official release (``denoising/``, ``deraining/``, ...): each task
    reads its own folders (:data:`~moceir.data.layouts.TRAIN_LAYOUTS`), repeated by
    :data:`~moceir.data.layouts.DEFAULT_REPEATS` unless ``repeats`` says otherwise. Any other
    folder of images: every task synthesises its degradation from those clean images (repeat 1).
    Returns ``(items, mode)`` with mode "official" or "synthetic". Raises DatasetLayoutError.
    """
    root = Path(data)
    if not root.is_dir():
        raise DatasetLayoutError(f"data folder not found: {root}")
    tasks = [canonical_task(t) for t in tasks]
    items: list[TrainItem] = []
    if is_official_root(root):
        for task in tasks:
            pairs = find_pairs(TRAIN_LAYOUTS[task], root)
            n = (repeats or {}).get(task, DEFAULT_REPEATS[task])
            items += [TrainItem(task, p.clean, p.degraded) for p in pairs] * n
        return items, "official"
    clean = clean_folder_images(root)
    if not clean:
        raise DatasetLayoutError(
            f"{root} holds neither the official dataset layout (denoising/, deraining/, dehazing/, ...: "
            "see `moceir train --help`) nor clean images to synthesise degradations from"
        )
    for task in tasks:
        if task not in SYNTHETIC_TASKS:
            raise DatasetLayoutError(
                f"{task} has no synthetic degradation: it needs its dataset (official layout)"
            )
        n = (repeats or {}).get(task, 1)
        items += [TrainItem(task, c) for c in clean] * n
    return items, "synthetic"


def fingerprint(items: list[TrainItem], root: Path | None = None) -> str:
    """A digest of the examples (task, file names or pixel digests) to detect a changed dataset."""
    h = hashlib.sha1()
    for it in items:
        h.update(it.task.encode())
        for src in (it.clean, it.degraded):
            if src is None:
                h.update(b"-")
            elif isinstance(src, np.ndarray):
                h.update(hashlib.sha1(np.ascontiguousarray(src).tobytes()).digest())
            else:
                name = src.relative_to(root) if root is not None and src.is_relative_to(root) else src
                h.update(str(name).encode())
    return h.hexdigest()[:16]


def load_source(src: Source) -> np.ndarray:
    """float32 [H, W, 3] in 0..1; RuntimeError naming the file when it cannot be read."""
    if isinstance(src, np.ndarray):
        return src.astype(np.float32) / 255.0 if src.dtype == np.uint8 else src.astype(np.float32)
    try:
        return read_image(src).rgb
    except ImageReadError as e:
        raise RuntimeError(f"training image {src}: {e}") from e


def _pad_to(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph == 0 and pw == 0:
        return image
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)


def random_crop(images: list[np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same ``size`` x ``size`` window of each image (images smaller than that are padded)."""
    images = [_pad_to(im, size) for im in images]
    h, w = images[0].shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return [im[top : top + size, left : left + size] for im in images]


def dihedral(image: np.ndarray, mode: int) -> np.ndarray:
    """One of the 8 flips/rotations: rotate by ``mode % 4`` quarter turns, then flip if ``mode >= 4``."""
    out = np.rot90(image, mode % 4)
    return np.ascontiguousarray(out[::-1] if mode >= 4 else out)


class TrainingStream:
    """Micro-batches of (degraded, clean) crops in the deterministic order described above.

    ``micro_batch(k)`` is the ``k``-th micro-batch of this rank: step ``k // accumulation``,
    micro-batch ``k % accumulation``. Items are shuffled once per epoch (a pass over ``items``).
    """

    def __init__(
        self,
        items: list[TrainItem],
        crop: int,
        batch_size: int,
        accumulation: int = 1,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if not items:
            raise ValueError("no training items")
        self.items, self.crop, self.batch_size = items, crop, batch_size
        self.accumulation, self.world, self.rank, self.seed = accumulation, world, rank, seed
        self.tasks = sorted({it.task for it in items})
        self._perm_epoch, self._perm = -1, np.arange(0)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.items) // self.global_batch)

    def _item(self, position: int) -> TrainItem:
        epoch, i = divmod(position, len(self.items))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 1_000_003, epoch]).permutation(len(self.items))
            self._perm_epoch = epoch
        return self.items[self._perm[i]]

    def sample(self, position: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(degraded, clean, task) of the sample at global ``position``: [crop, crop, 3] float32."""
        item = self._item(position)
        rng = np.random.default_rng([self.seed, position])
        clean = load_source(item.clean)
        if item.degraded is None:
            (clean,) = random_crop([clean], self.crop, rng)
            clean = dihedral(clean, int(rng.integers(8)))
            degraded = degrade(item.task, clean, rng)
        else:
            degraded = load_source(item.degraded)
            if degraded.shape != clean.shape:
                raise RuntimeError(
                    f"degraded {item.degraded} ({degraded.shape[1]}x{degraded.shape[0]}) and clean "
                    f"{item.clean} ({clean.shape[1]}x{clean.shape[0]}) differ in size"
                )
            degraded, clean = random_crop([degraded, clean], self.crop, rng)
            mode = int(rng.integers(8))
            degraded, clean = dihedral(degraded, mode), dihedral(clean, mode)
        return degraded.astype(np.float32), clean.astype(np.float32), item.task

    def positions(self, k: int) -> range:
        step, a = divmod(k, self.accumulation)
        start = step * self.global_batch + (a * self.world + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def micro_batch(self, k: int) -> dict[str, torch.Tensor]:
        """``{"degraded", "clean": [b, 3, crop, crop] float32, "task": [b] int64 (index in tasks)}``."""
        samples = [self.sample(p) for p in self.positions(k)]
        to_t = lambda arrs: torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return {
            "degraded": to_t([s[0] for s in samples]),
            "clean": to_t([s[1] for s in samples]),
            "task": torch.tensor([self.tasks.index(s[2]) for s in samples]),
        }


class MicroBatchDataset(torch.utils.data.Dataset):
    """Map-style view of a :class:`TrainingStream` for a DataLoader (``batch_size=None``)."""

    def __init__(self, stream: TrainingStream, length: int) -> None:
        self.stream, self.length = stream, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return self.stream.micro_batch(k)
