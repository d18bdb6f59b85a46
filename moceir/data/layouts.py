"""The official dataset layouts (as the MoCE-IR / PromptIR releases arrange them) and pairing.

Everything is relative to one data root (``--data DIR``). Degraded and clean images are paired
by file name (the official code pairs by sorted order, which silently mismatches as soon as one
file is missing); a missing folder raises :class:`DatasetLayoutError`, which names the folder and
prints the layout expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moceir.images import IMAGE_EXTENSIONS

#: Every task name, canonical spelling.
TASKS = ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur", "lowlight", "cdd11")
#: Other spellings accepted on the command line (the official code's names).
TASK_ALIASES = {"gopro": "deblur", "lolv1": "lowlight", "synllie": "lowlight", "CDD11": "cdd11"}
#: Top-level folders whose presence marks a data root laid out as the official release.
OFFICIAL_ROOTS = ("denoising", "deraining", "dehazing", "deblurring", "llie", "cdd11")
#: How often the official recipe repeats each task's training images so tasks are balanced.
DEFAULT_REPEATS = {
    "denoise_15": 3,
    "denoise_25": 3,
    "denoise_50": 3,
    "derain": 120,
    "dehaze": 1,
    "deblur": 5,
    "lowlight": 20,
    "cdd11": 2,
}


class DatasetLayoutError(ValueError):
    """A dataset folder is missing or its files cannot be paired (the message says which)."""


def canonical_task(name: str) -> str:
    """The canonical name of a task (``gopro`` -> ``deblur``); ValueError for an unknown one."""
    name = TASK_ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)} (aliases: {TASK_ALIASES})")
    return name


@dataclass(frozen=True)
class Pair:
    """One example: ``degraded`` is None when it is synthesised from ``clean``."""

    clean: Path
    degraded: Path | None
    #: sub-set of a benchmark (CDD-11 degradation folder), else "".
    subset: str = ""

    @property
    def name(self) -> str:
        return (self.degraded or self.clean).stem


# --- pairing ---------------------------------------------------------------------------------


def _digits_key(path: Path) -> str:
    # rain-12.png <-> norain-12.png (Rain100L, RainTrainL)
    nums = re.findall(r"\d+", path.stem)
    return "-".join(str(int(n)) for n in nums) if nums else path.stem


def _first_token_key(path: Path) -> str:
    # 0001_0.8_0.2.jpg <-> 0001.png (SOTS, RESIDE/OTS)
    return path.stem.split("_")[0]


KEYS: dict[str, Callable[[Path], str]] = {
    "stem": lambda p: p.stem,
    "digits": _digits_key,
    "first_token": _first_token_key,
}


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def pair_by_name(degraded: list[Path], clean: list[Path], key: str = "stem", subset: str = "") -> list[Pair]:
    """Pair each degraded image with the clean image of the same name.

    Identical stems pair first; otherwise ``key`` ("digits": the numbers in the name,
    "first_token": the part before the first underscore) decides. Clean images without a
    degraded partner are ignored (several hazy images share one clean image); a degraded image
    without a clean partner, or an ambiguous clean name, raises DatasetLayoutError.
    """
    by_stem = {p.stem: p for p in clean}
    by_key: dict[str, list[Path]] = {}
    for p in clean:
        by_key.setdefault(KEYS[key](p), []).append(p)
    pairs, unmatched = [], []
    for d in degraded:
        if d.stem in by_stem:
            pairs.append(Pair(by_stem[d.stem], d, subset))
            continue
        candidates = by_key.get(KEYS[key](d), [])
        if len(candidates) == 1:
            pairs.append(Pair(candidates[0], d, subset))
        elif not candidates:
            unmatched.append(d)
        else:
            raise DatasetLayoutError(
                f"{d} matches several clean images ({', '.join(c.name for c in candidates[:4])}): "
                "rename them so each degraded image has one clean partner"
            )
    if unmatched:
        folder = clean[0].parent if clean else "the clean folder"
        raise DatasetLayoutError(
            f"{len(unmatched)} degraded images have no clean image of the same name in {folder}, e.g. "
            + ", ".join(str(u) for u in unmatched[:3])
        )
    return pairs


# --- layouts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a task's images live under the data root.

    ``degraded`` lists folders of degraded images (all of them must exist unless ``any_of``);
    ``clean`` the folder(s) of clean images; with ``degraded`` empty the task is synthetic
    (noise added on the fly to the clean images). ``subsets``: every sub-folder of the parent of
    ``clean`` except the clean one is a degradation (CDD-11).
    """

    task: str
    description: str
    clean: tuple[str, ...]
    degraded: tuple[str, ...] = ()
    key: str = "stem"
    any_of: bool = False
    subsets: bool = False

    def expected(self, root: Path | str = "DATA") -> str:
        """The layout as text, for help and error messages."""
        lines = [f"{self.task}: {self.description}"]
        for d in self.degraded:
            lines.append(f"  {root}/{d}/   degraded images")
        if self.subsets:
            lines.append(f"  {root}/{Path(self.clean[0]).parent}/<degradation>/   one folder per degradation")
        for c in self.clean:
            lines.append(
                f"  {root}/{c}/   clean images"
                + (" (noise is added on the fly)" if not self.degraded and not self.subsets else "")
            )
        if self.any_of:
            lines.append("  (at least one of the folders above)")
        if self.key != "stem" or self.degraded or self.subsets:
            how = {
                "stem": "same file name",
                "digits": "same number in the name",
                "first_token": "name before '_'",
            }
            lines.append(f"  pairs: degraded <-> clean by {how[self.key]}")
        return "\n".join(lines)


_DENOISE_TRAIN = ("denoising/BSD400", "denoising/WaterlooED")
_DENOISE_TEST = ("denoising/cBSD68/original_png",)

TRAIN_LAYOUTS: dict[str, Layout] = {
    **{
        f"denoise_{s}": Layout(
            f"denoise_{s}", f"BSD400 + WED, Gaussian noise sigma {s}", _DENOISE_TRAIN, any_of=True
        )
        for s in (15, 25, 50)
    },
    "derain": Layout(
        "derain",
        "RainTrainL (Rain100L training set)",
        ("deraining/RainTrainL/gt",),
        ("deraining/RainTrainL/rainy",),
        key="digits",
    ),
    "dehaze": Layout(
        "dehaze",
        "RESIDE OTS (parts 1-4)",
        ("dehazing/RESIDE/clear",),
        tuple(f"dehazing/RESIDE/part{i}" for i in range(1, 5)),
        key="first_token",
        any_of=True,
    ),
    "deblur": Layout(
        "deblur",
        "GoPro training crops",
        ("deblurring/GoPro/crop/train/target_crops",),
        ("deblurring/GoPro/crop/train/input_crops",),
    ),
    "lowlight": Layout(
        "lowlight", "LOL-v1 training set", ("llie/LOLv1/Train/target",), ("llie/LOLv1/Train/input",)
    ),
    "cdd11": Layout("cdd11", "CDD-11 training set", ("cdd11/train/clear",), subsets=True),
}

TEST_LAYOUTS: dict[str, Layout] = {
    **{
        f"denoise_{s}": Layout(
            f"denoise_{s}",
            f"CBSD68, Gaussian noise sigma {s} added with seed 0 as the official code",
            _DENOISE_TEST,
        )
        for s in (15, 25, 50)
    },
    "derain": Layout(
        "derain", "Rain100L", ("deraining/Rain100L/gt",), ("deraining/Rain100L/rainy",), key="digits"
    ),
    "dehaze": Layout(
        "dehaze",
        "SOTS outdoor",
        ("dehazing/SOTS/outdoor/gt",),
        ("dehazing/SOTS/outdoor/hazy",),
        key="first_token",
    ),
    "deblur": Layout(
        "deblur", "GoPro test set", ("deblurring/GoPro/test/target",), ("deblurring/GoPro/test/input",)
    ),
    "lowlight": Layout(
        "lowlight", "LOL-v1 test set", ("llie/LOLv1/Test/target",), ("llie/LOLv1/Test/input",)
    ),
    "cdd11": Layout(
        "cdd11", "CDD-11 test set (each degradation reported on its own)", ("cdd11/test/clear",), subsets=True
    ),
}


def describe_layouts(layouts: dict[str, Layout], root: str = "DATA") -> str:
    """All layouts as text (deduplicating the three denoising sigmas)."""
    seen, parts = set(), []
    for layout in layouts.values():
        if layout.clean + layout.degraded in seen:
            continue
        seen.add(layout.clean + layout.degraded)
        text = layout.expected(root)
        if layout.task.startswith("denoise_"):
            text = text.replace(layout.task, "denoise_15 / denoise_25 / denoise_50", 1)
            text = re.sub(r"sigma \d+", "sigma 15/25/50", text)
        parts.append(text)
    return "\n".join(parts)


def _missing(layout: Layout, root: Path, folder: Path) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{layout.task}: folder not found: {folder}\nexpected layout (the official MoCE-IR/PromptIR one):\n"
        + layout.expected(root)
    )


def _images_of(layout: Layout, root: Path, folders: tuple[str, ...]) -> list[Path]:
    existing = [root / f for f in folders if (root / f).is_dir()]
    needed = folders if not layout.any_of else ()
    for f in needed:
        if not (root / f).is_dir():
            raise _missing(layout, root, root / f)
    if not existing:
        raise _missing(layout, root, root / folders[0])
    files = [p for folder in existing for p in list_images(folder)]
    if not files:
        raise DatasetLayoutError(
            f"{layout.task}: no images in {', '.join(str(e) for e in existing)}\nexpected layout:\n"
            + layout.expected(root)
        )
    return files


def find_pairs(layout: Layout, root: str | Path) -> list[Pair]:
    """The examples of ``layout`` under ``root``; DatasetLayoutError when a folder is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"data folder not found: {root}")
    if layout.subsets:
        clean_dir = root / layout.clean[0]
        if not clean_dir.is_dir():
            raise _missing(layout, root, clean_dir)
        clean = list_images(clean_dir)
        pairs = []
        for sub in sorted(p for p in clean_dir.parent.iterdir() if p.is_dir() and p != clean_dir):
            pairs += pair_by_name(list_images(sub), clean, layout.key, subset=sub.name)
        if not pairs:
            raise DatasetLayoutError(
                f"{layout.task}: no degradation folders beside {clean_dir}\nexpected layout:\n"
                + layout.expected(root)
            )
        return pairs
    clean = _images_of(layout, root, layout.clean)
    if not layout.degraded:
        return [Pair(c, None) for c in clean]
    degraded = _images_of(layout, root, layout.degraded)
    return pair_by_name(degraded, clean, layout.key)


def is_official_root(root: str | Path) -> bool:
    """Whether ``root`` holds at least one of the official top-level dataset folders."""
    root = Path(root)
    return any((root / name).is_dir() for name in OFFICIAL_ROOTS)
