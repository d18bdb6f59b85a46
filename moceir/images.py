"""Reading and writing images for the command line: robust to what users actually have.

Images become float32 RGB arrays ``[H, W, 3]`` in 0..1. Grayscale, palette, 16-bit, CMYK and
images with alpha are converted (the alpha channel is kept aside so the restored PNG gets it
back); EXIF orientation is applied. Unreadable, truncated and non-image files raise
:class:`ImageReadError` with the reason, so a caller can skip them and go on.
"""

from __future__ import annotations

import glob
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

#: Extensions looked for inside folders (files named on the command line are tried whatever
#: their extension).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# A truncated file must fail loudly, never be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageReadError(Exception):
    """A file that cannot be decoded as an image (the message says why)."""


@dataclass
class LoadedImage:
    """An image as the model sees it, plus what is needed to write it back in its own form."""

    #: float32 [H, W, 3] in 0..1.
    rgb: np.ndarray
    #: PIL mode of the file ("RGB", "L", "RGBA", "I;16", ...).
    mode: str
    #: float32 [H, W] in 0..1 when the file had an alpha channel.
    alpha: np.ndarray | None = None
    #: what was done to make it RGB, for the report (empty when nothing).
    notes: list[str] = field(default_factory=list)

    @property
    def grayscale(self) -> bool:
        return self.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def collect_inputs(
    inputs: list[str], recursive: bool = True, exclude: Path | None = None
) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Expand files, folders and glob patterns into image files, in a stable order.

    Returns ``(found, problems)``: ``found`` lists ``(file, root)`` pairs where ``root`` is the
    folder the file's output name is made relative to (the folder given, or the file's own
    folder); ``problems`` lists ``(input, reason)`` for inputs that match nothing. Files under
    ``exclude`` (the output folder) found by expanding a folder or a pattern are left out (files
    named explicitly are kept). Duplicates are kept once.
    """
    found: list[tuple[Path, Path]] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()
    exclude = exclude.resolve() if exclude is not None else None

    def add(path: Path, root: Path, explicit: bool = False) -> None:
        resolved = path.resolve()
        excluded = exclude is not None and not explicit and resolved.is_relative_to(exclude)
        if resolved in seen or excluded:
            return
        seen.add(resolved)
        found.append((path, root))

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(
                p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                problems.append(
                    (item, f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files in this folder")
                )
            for f in files:
                add(f, path)
        elif path.is_file():
            add(path, path.parent, explicit=True)
        elif _is_pattern(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                problems.append((item, "the pattern matches no file"))
            for f in files:
                add(f, f.parent)
        else:
            problems.append((item, "no such file or folder"))
    return found, problems


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file's header, without decoding the pixels. Raises ImageReadError."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(_reason(e)) from e
    # EXIF orientations 5..8 swap width and height.
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image (or a format Pillow cannot read)"
    if isinstance(e, Image.DecompressionBombError):
        return f"too many pixels for Pillow's safety limit ({e})"
    text = str(e)
    if "truncated" in text:
        return f"truncated image file ({text})"
    return f"cannot decode: {text}"


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Decode ``path`` into a :class:`LoadedImage`. Raises ImageReadError saying why it cannot."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                frames = getattr(opened, "n_frames", 1)
                return _to_rgb(ImageOps.exif_transpose(opened), frames)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(_reason(e)) from e


def _to_rgb(im: Image.Image, frames: int) -> LoadedImage:
    mode, notes = im.mode, []
    if frames > 1:
        notes.append(f"first of {frames} frames")
    alpha = None
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = (
            1.0 if mode == "F" else (65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0)
        )
        gray = np.clip(a / scale, 0, 1).astype(np.float32)
        notes.append(f"{mode} (high bit depth) grayscale -> 8-bit RGB")
        return LoadedImage(np.repeat(gray[..., None], 3, axis=2), mode, None, notes)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba, dtype=np.float32)[..., 3] / 255.0
        notes.append(f"{mode} -> RGB, alpha kept and re-attached")
        rgb = np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255.0
        return LoadedImage(rgb, mode, alpha, notes)
    if mode != "RGB":
        notes.append(f"{mode} -> RGB")
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return LoadedImage(rgb, mode, None, notes)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float in 0..1 (clamped) -> uint8, rounding to nearest."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray, like: LoadedImage | None = None) -> None:
    """Write ``rgb`` ([H, W, 3] float 0..1) as a PNG, atomically (temporary file, then rename).

    With ``like``, the file takes the input's form back: grayscale inputs are written as
    grayscale (mean of the channels), inputs with alpha get their alpha channel back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if like is not None and like.grayscale and like.alpha is None:
        im = Image.fromarray(to_uint8(rgb.mean(axis=2)))
    elif like is not None and like.alpha is not None:
        data = np.concatenate([rgb, like.alpha[..., None]], axis=2)
        im = Image.fromarray(to_uint8(data))
    else:
        im = Image.fromarray(to_uint8(rgb))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        im.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
