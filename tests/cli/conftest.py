"""Fixtures for the command-line tests: tiny images, a tiny checkpoint, official layouts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import moceir

#: A MoCE-IR-S with one block per stage and width 8: every code path, a fraction of the cost.
TINY = {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_dec_blocks": (1, 1, 1), "num_refinement_blocks": 1}
TINY_ARGS = ["dim=8", "num_blocks=1,1,1,1", "num_dec_blocks=1,1,1", "num_refinement_blocks=1"]


def write_image(path: Path, h: int, w: int, seed: int = 0, mode: str = "RGB") -> Path:
    """A smooth random image (so restoration metrics are not degenerate) written to ``path``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c + rng.uniform(0, 3)) * np.cos(4 * yy + c) for c in range(3)], axis=2)
    rgb = np.round((0.5 + 0.4 * base + 0.05 * rng.standard_normal((h, w, 3))).clip(0, 1) * 255).astype(
        np.uint8
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(rgb)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP threads that wait
    on each other make every step 10-100x slower: one intra-op thread for these tests (the DDP
    parity test also needs the thread count of its torchrun processes). Module scope, restored
    afterwards: other test folders keep their own setting."""
    import torch  # noqa: PLC0415

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Weights of a tiny MoCE-IR (random, perturbed) saved with save_checkpoint."""
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    model = moceir.build_model("moce_ir_s", **TINY)
    with torch.no_grad():
        model.output.weight.mul_(0.1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    moceir.save_checkpoint(model, path)
    return path


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, h, w, seed=0, mode="RGB")``: write a test image."""
    return write_image


def write_official_layout(root: Path, n: int = 3, size: tuple[int, int] = (24, 28)) -> Path:
    """A miniature of the official training + test trees (every task), paired by name."""
    h, w = size
    s = 0
    for folder, ext in (("denoising/BSD400", "jpg"), ("denoising/WaterlooED", "bmp")):
        for i in range(n):
            write_image(root / folder / f"{i:03d}.{ext}", h, w, s := s + 1)
    pairs = {
        "deraining/RainTrainL": ("rainy", "gt", lambda i: (f"rain-{i + 1}.png", f"norain-{i + 1}.png")),
        "deraining/Rain100L": ("rainy", "gt", lambda i: (f"rain-{i + 1:03d}.png", f"norain-{i + 1:03d}.png")),
        "deblurring/GoPro/crop/train": ("input_crops", "target_crops", lambda i: (f"{i}.png", f"{i}.png")),
        "deblurring/GoPro/test": ("input", "target", lambda i: (f"{i}.png", f"{i}.png")),
        "llie/LOLv1/Train": ("input", "target", lambda i: (f"{i}.png", f"{i}.png")),
        "llie/LOLv1/Test": ("input", "target", lambda i: (f"{i}.png", f"{i}.png")),
        "dehazing/SOTS/outdoor": ("hazy", "gt", lambda i: (f"{i:04d}_0.8_0.2.jpg", f"{i:04d}.png")),
    }
    for base, (deg, clean, names) in pairs.items():
        for i in range(n):
            dn, cn = names(i)
            write_image(root / base / clean / cn, h, w, s := s + 1)
            write_image(root / base / deg / dn, h, w, s := s + 1)
    for i in range(n):
        write_image(root / "dehazing/RESIDE/clear" / f"{i:04d}.jpg", h, w, s := s + 1)
        write_image(root / "dehazing/RESIDE/part1" / f"{i:04d}_0.8_0.2.jpg", h, w, s := s + 1)
        write_image(root / "denoising/cBSD68/original_png" / f"{i}.png", h, w, s := s + 1)
        for split in ("train", "test"):
            write_image(root / f"cdd11/{split}/clear/{i}.png", h, w, s := s + 1)
            for sub in ("haze", "low_rain"):
                write_image(root / f"cdd11/{split}/{sub}/{i}.png", h, w, s := s + 1)
    return root


@pytest.fixture(scope="session")
def official_data(tmp_path_factory) -> Path:
    return write_official_layout(tmp_path_factory.mktemp("data"))
