"""``moceir restore``: restore image files with MoCE-IR and report the experts each one used.

The engine (:class:`Restorer`) batches images of equal size, runs big images in overlapping
tiles blended with linear ramps, and falls back to smaller batches and then tiles when the
device runs out of memory. The command around it expands files/folders/globs, never overwrites
an input, skips unreadable files (naming them) and writes ``report.json`` and ``report.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import numbers
import os
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import moceir
from moceir.cuda_graphs import GraphedInference
from moceir.images import ImageReadError, LoadedImage, collect_inputs, image_size, read_image, write_png
from moceir.layers.adapter import MoCELayer
from moceir.runtime import CLIError, add_model_arguments, load_model, resolve_checkpoint, resolve_device

#: Smallest tile the out-of-memory fallback goes down to.
MIN_TILE = 64
#: Input shapes whose CUDA graph a ``Restorer(cuda_graph=True)`` keeps (least recently used go).
MAX_GRAPHS = 4


# --- the engine ------------------------------------------------------------------------------


@dataclass
class Restored:
    """One restored image: float32 [H, W, 3] (not clamped) and the routing it took."""

    image: np.ndarray
    #: per adapter (forward order), the k experts chosen (for a tiled image: the most frequent).
    experts: list[list[int]]
    tiles: int = 1
    #: per adapter, how many tiles chose each expert (tiled images only).
    expert_counts: list[dict[int, int]] | None = None


def adapter_names(model: moceir.MoCEIR) -> list[str]:
    """Short names of the adapters in forward order: ``dec0.b0`` ... (level, block in level)."""
    names = []
    for level, n in enumerate(model.config.num_dec_blocks):
        names += [f"dec{level}.b{j}" for j in range(n)]
    assert len(names) == sum(isinstance(m, MoCELayer) for m in model.modules())
    return names


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``length`` px, overlapping >= ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def blend_ramp(n: int, overlap: int) -> np.ndarray:
    """Per-pixel blending weight along one side of a tile of ``n`` px: a linear ramp over
    ``overlap`` px at both ends, strictly positive (so normalising by the sum is safe)."""
    i = np.arange(n, dtype=np.float32)
    r = float(overlap + 1)
    return np.minimum(1.0, np.minimum((i + 1) / r, (n - i) / r))


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def check_options(batch_size: int, tile: int, tile_overlap: int) -> None:
    """Raise ValueError, naming the option, unless ``batch_size`` >= 1, ``tile`` >= 0 and, when
    tiling, 0 <= ``tile_overlap`` < ``tile``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"--batch-size must be an int >= 1, got {batch_size!r}")
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 0:
        raise ValueError(f"--tile must be an int >= 0 (0: no tiling), got {tile!r}")
    if tile and not 0 <= tile_overlap < tile:
        raise ValueError(f"--tile-overlap must be in 0..tile-1 = 0..{tile - 1}, got {tile_overlap}")


class Restorer:
    """Runs ``model`` on lists of equal-size images ([H, W, 3] float arrays in 0..1).

    ``tile`` > 0: images with a side above ``tile`` run in ``tile`` x ``tile`` tiles (the
    overlap is inside the tile: neighbours share at least ``tile_overlap`` px), up to
    ``batch_size`` tiles per model call, blended with :func:`blend_ramp` weights. Out of memory:
    the batch is split, then a single image is tiled (halving the tile down to 64 px).

    What tiling guarantees, and what not:

    - Memory: the model never sees more than ``batch_size`` x ``tile`` x ``tile`` pixels per
      call (padded inside the network to multiples of 8), so its activations are bounded by
      the tile, whatever the image size. The blending buffers are O(H x W): 16 bytes per
      pixel, beside the input and output images.
    - Each tile is restored as an image of its own: where one tile alone covers a pixel the
      output is that tile's restoration (to float rounding); in overlaps, the weighted mean of
      the tiles' restorations (linear ramps, no hard seams).
    - It is not the restoration of the whole image, and no tolerance holds for every model:
      each tile is routed on its own (its experts are picked from its own pooled features, so
      tiles of one image may use different experts; the report gives the most frequent and the
      counts), and the network's global operations (the channel attention over all pixels, the
      frequency embedding's mean) see only the tile. The difference is as large inside tiles as
      at their seams; a larger tile brings the result closer to the whole-image restoration.
      Measured for one small model: ``tests/reliability/test_tiled_restore.py``.

    ``cuda_graph``: each model call replays a CUDA graph captured once per input shape (a
    tiled image has one tile shape; a short batch is filled up with copies of its last image,
    whose outputs are dropped), so a call costs one host launch instead of thousands. At most
    :data:`MAX_GRAPHS` shapes keep their graph (and its memory); on a CPU the same forward runs
    without a graph (``GraphedInference(capture=False)``, for tests).

    Raises ValueError for ``batch_size`` < 1, ``tile`` < 0 or an overlap outside 0..tile-1.
    """

    def __init__(
        self,
        model: moceir.MoCEIR,
        device: torch.device,
        batch_size: int = 4,
        tile: int = 0,
        tile_overlap: int = 32,
        cuda_graph: bool = False,
    ) -> None:
        check_options(batch_size, tile, tile_overlap)
        self.model, self.device = model, device
        self.batch_size, self.tile, self.tile_overlap = batch_size, tile, tile_overlap
        self.dtype = next(model.parameters()).dtype
        self.cuda_graph = cuda_graph
        self._graphs: OrderedDict[tuple, GraphedInference] = OrderedDict()

    def _graphed(self, x: torch.Tensor) -> GraphedInference:
        key = tuple(x.shape)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)  # its graph and memory pool go with it
        graphed = GraphedInference(self.model.eval(), x, capture=self.device.type == "cuda")
        self._graphs[key] = graphed
        return graphed

    def _forward(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Outputs [B, H, W, 3] float32 and experts [B, adapters, k] of one model call."""
        n = len(images)
        if self.cuda_graph and n < self.batch_size:  # one graph per shape: fill the batch up
            images = [*images, *[images[-1]] * (self.batch_size - n)]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device, self.dtype)
        with torch.inference_mode():
            if self.cuda_graph:
                graphed = self._graphed(x)
                y = graphed(x, copy_output=False)
                choices = graphed.routing_choices
            else:
                y = self.model(x)
                choices = self.model.routing_choices()
            experts = torch.stack(choices, dim=1)[:n]  # [B, adapters, k]
            out = y[:n].float().permute(0, 2, 3, 1).cpu().numpy()
        return out, experts.cpu().numpy()

    def __call__(self, images: Sequence[np.ndarray]) -> list[Restored]:
        if not images:
            return []
        h, w = images[0].shape[:2]
        if any(im.shape != images[0].shape for im in images):
            raise ValueError("Restorer takes images of one size per call")
        if self.tile and max(h, w) > self.tile:
            return [self._tiled(im, self.tile) for im in images]
        results: list[Restored] = []
        for start in range(0, len(images), self.batch_size):
            results += self._batch(images[start : start + self.batch_size])
        return results

    def _batch(self, images: Sequence[np.ndarray]) -> list[Restored]:
        try:
            out, experts = self._forward(images)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            self._free()
            if len(images) > 1:
                half = len(images) // 2
                return self._batch(images[:half]) + self._batch(images[half:])
            h, w = images[0].shape[:2]
            tile = max(MIN_TILE, (max(h, w) // 2) // 8 * 8)
            if max(h, w) <= MIN_TILE:
                raise
            print(f"out of memory on a {h}x{w} image: retrying in {tile}px tiles", file=sys.stderr)
            return [self._tiled(images[0], tile)]
        return [Restored(o, e.tolist()) for o, e in zip(out, experts, strict=True)]

    def _free(self) -> None:
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tiled(self, image: np.ndarray, tile: int) -> Restored:
        h, w = image.shape[:2]
        overlap = min(self.tile_overlap, tile - 1)
        boxes = [(y, x) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]
        th, tw = min(tile, h), min(tile, w)
        weight = np.outer(blend_ramp(th, overlap), blend_ramp(tw, overlap))[..., None]
        acc = np.zeros((h, w, 3), np.float32)
        wsum = np.zeros((h, w, 1), np.float32)
        counts: list[Counter] | None = None
        try:
            for start in range(0, len(boxes), self.batch_size):
                chunk = boxes[start : start + self.batch_size]
                out, experts = self._forward([image[y : y + th, x : x + tw] for y, x in chunk])
                for (y, x), o in zip(chunk, out, strict=True):
                    acc[y : y + th, x : x + tw] += o * weight
                    wsum[y : y + th, x : x + tw] += weight
                if counts is None:
                    counts = [Counter() for _ in range(experts.shape[1])]
                for per_tile in experts:
                    for a, picks in enumerate(per_tile):
                        counts[a].update(int(e) for e in picks)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e) or tile // 2 < MIN_TILE:
                raise
            self._free()
            return self._tiled(image, tile // 2 // 8 * 8)
        assert counts is not None
        k = self.model.config.top_k
        majority = [[e for e, _ in c.most_common(k)] for c in counts]
        return Restored(acc / wsum, majority, len(boxes), [dict(sorted(c.items())) for c in counts])


def plan_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by size (first-seen order), cut into batches of at most ``batch_size``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(tuple(s), []).append(i)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), max(1, batch_size))]


# --- the command -----------------------------------------------------------------------------


@dataclass
class Job:
    """One input file and what happened to it."""

    input: Path
    output: Path | None = None
    status: str = "pending"  # restored | skipped
    reason: str = ""
    size: tuple[int, int] | None = None
    mode: str = ""
    notes: list[str] = field(default_factory=list)
    tiles: int = 0
    experts: list[list[int]] | None = None
    expert_counts: list[dict[int, int]] | None = None
    seconds: float = 0.0


def _inside_problem(inputs: list[str], found: list[tuple[Path, Path]], outdir: Path) -> str | None:
    out = outdir.resolve()
    for item in inputs:
        p = Path(item)
        if p.is_dir() and out.is_relative_to(p.resolve()):
            return f"the output folder {outdir} is inside the input folder {item}"
    for f, _ in found:
        if f.resolve().is_relative_to(out):
            return f"the input {f} is inside the output folder {outdir}"
    return None


def _output_paths(found: list[tuple[Path, Path]], outdir: Path) -> list[Path]:
    """``outdir / <path relative to its root>.png``; a clash with an earlier output appends the
    source extension (``p_jpg.png``) and then a counter; a path equal to an input (possible with
    --allow-inside) gets ``_restored``: an input is never overwritten."""
    inputs = {f.resolve() for f, _ in found}
    taken: set[Path] = set()
    outputs = []
    for f, root in found:
        rel = f.relative_to(root) if f.is_relative_to(root) else Path(f.name)
        candidate = outdir / rel.with_suffix(".png")
        if candidate.resolve() in inputs:
            candidate = candidate.with_name(f"{rel.stem}_restored.png")
        if candidate in taken:
            candidate = candidate.with_name(f"{candidate.stem}_{f.suffix.lstrip('.').lower()}.png")
        base, n = candidate, 2
        while candidate in taken or candidate.resolve() in inputs:
            candidate = base.with_name(f"{base.stem}_{n}.png")
            n += 1
        taken.add(candidate)
        outputs.append(candidate)
    return outputs


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_report(path_json: Path, path_csv: Path, jobs: list[Job], header: dict, blocks: list[str]) -> None:
    """The JSON report (run details + one entry per input) and the CSV (one row per input,
    one column per decoder block holding the chosen expert(s), ``+``-joined for k > 1)."""
    images = []
    for j in jobs:
        entry = {
            "input": str(j.input),
            "output": str(j.output) if j.output and j.status == "restored" else None,
            "status": j.status,
        }
        if j.reason:
            entry["reason"] = j.reason
        if j.size:
            entry["height"], entry["width"] = j.size
        if j.mode:
            entry["mode"] = j.mode
        if j.notes:
            entry["converted"] = "; ".join(j.notes)
        if j.experts is not None:
            entry["tiles"] = j.tiles
            entry["experts"] = dict(zip(blocks, j.experts, strict=True))
            if j.expert_counts is not None:
                entry["expert_counts_over_tiles"] = {
                    b: {str(k): v for k, v in c.items()} for b, c in zip(blocks, j.expert_counts, strict=True)
                }
            entry["seconds"] = round(j.seconds, 4)
        images.append(entry)
    report = {
        **header,
        "restored": sum(j.status == "restored" for j in jobs),
        "skipped": [{"input": str(j.input), "reason": j.reason} for j in jobs if j.status != "restored"],
        "images": images,
    }
    _atomic_text(path_json, json.dumps(report, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["input", "output", "status", "height", "width", "mode", "tiles", *blocks, "reason"])
    for j in jobs:
        experts = (
            ["+".join(str(e) for e in picks) for picks in j.experts] if j.experts else [""] * len(blocks)
        )
        h, w = j.size or ("", "")
        out = str(j.output) if j.output and j.status == "restored" else ""
        writer.writerow([str(j.input), out, j.status, h, w, j.mode, j.tiles or "", *experts, j.reason])
    _atomic_text(path_csv, buf.getvalue())


def _read_all(jobs: list[Job], idx: list[int]) -> list[LoadedImage | ImageReadError]:
    out: list[LoadedImage | ImageReadError] = []
    for i in idx:
        try:
            out.append(read_image(jobs[i].input))
        except ImageReadError as e:
            out.append(e)
    return out


def _prefetch(jobs: list[Job], batches: list[list[int]], workers: int) -> Iterator[tuple[list[int], list]]:
    """Decode the next batch in a thread while the current one runs on the model."""
    if workers <= 0:
        for idx in batches:
            yield idx, _read_all(jobs, idx)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: Future | None = None
        for n, idx in enumerate(batches):
            current = pending or pool.submit(_read_all, jobs, idx)
            pending = pool.submit(_read_all, jobs, batches[n + 1]) if n + 1 < len(batches) else None
            yield idx, current.result()


def run(args: argparse.Namespace) -> int:
    outdir = Path(args.output_dir)
    # Option errors first: before anything is read, loaded or written.
    try:
        check_options(args.batch_size, args.tile, args.tile_overlap)
    except ValueError as e:
        raise CLIError(str(e)) from e
    if outdir.exists() and not outdir.is_dir():
        raise CLIError(f"-o/--output-dir {outdir} exists and is not a folder")
    found, problems = collect_inputs(
        args.inputs, recursive=not args.no_recursive, exclude=outdir if args.allow_inside else None
    )
    if not args.allow_inside:
        problem = _inside_problem(args.inputs, found, outdir)
        if problem:
            raise CLIError(
                f"{problem}: restored images would mix with the inputs (and be read as inputs next time). "
                "Choose another -o, or pass --allow-inside (inputs are never overwritten)."
            )
    for item, reason in problems:
        print(f"skipping {item}: {reason}", file=sys.stderr)
    if not found:
        why = "; ".join(f"{i}: {r}" for i, r in problems) or "every match is inside the output folder"
        raise CLIError(f"no input images found ({why})")
    device = resolve_device(args.device)
    if args.cuda_graph and (device.type != "cuda" or args.backend == "reference"):
        raise CLIError(
            "--cuda-graph needs a CUDA device and a fast --backend, "
            f"got --device {device} --backend {args.backend}"
        )
    model = load_model(args.checkpoint, args.config, args.backend, device, args.precision)
    blocks = adapter_names(model)
    try:
        restorer = Restorer(model, device, args.batch_size, args.tile, args.tile_overlap, args.cuda_graph)
    except ValueError as e:
        raise CLIError(str(e)) from e

    jobs = [Job(f, o) for (f, _), o in zip(found, _output_paths(found, outdir), strict=True)]
    jobs += [Job(Path(item), None, "skipped", reason) for item, reason in problems]
    todo = []
    for i, job in enumerate(jobs):
        if job.status != "pending":
            continue
        if job.output.exists() and not args.overwrite:
            job.status, job.reason = "skipped", f"{job.output} exists (pass --overwrite to replace it)"
            print(f"skipping {job.input}: {job.reason}", file=sys.stderr)
            continue
        try:
            job.size = image_size(job.input)
            todo.append(i)
        except ImageReadError as e:
            job.status, job.reason = "skipped", str(e)
            print(f"skipping {job.input}: {e}", file=sys.stderr)

    try:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / args.report_name).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create the output folder {outdir}: {e}") from e
    weights = str(resolve_checkpoint(args.checkpoint)) if args.checkpoint else "RANDOM (no --checkpoint)"
    print(
        f"restoring {len(todo)} images on {device} "
        f"(backend {args.backend}, {args.precision}, weights {weights})",
        file=sys.stderr,
    )
    batches = plan_batches([jobs[i].size for i in todo], args.batch_size)
    batches = [[todo[i] for i in b] for b in batches]
    bar = tqdm(total=len(todo), unit="img", disable=args.quiet, file=sys.stderr)
    try:
        _restore_all(jobs, batches, restorer, bar, args.workers)
    except KeyboardInterrupt:
        for job in jobs:
            if job.status == "pending":
                job.status, job.reason = "skipped", "interrupted (Ctrl-C) before it was restored"
        raise
    finally:
        bar.close()
        _write_reports(args, jobs, model, device, weights, blocks, outdir)
    restored = sum(j.status == "restored" for j in jobs)
    skipped = [j for j in jobs if j.status != "restored"]
    print(
        f"restored {restored} images into {outdir}/ (report: {args.report_name.with_suffix('.json')}, .csv)"
    )
    if skipped:
        print(f"skipped {len(skipped)}:", file=sys.stderr)
        for j in skipped:
            print(f"  {j.input}: {j.reason}", file=sys.stderr)
    return 0 if not skipped else 1


def _restore_all(
    jobs: list[Job], batches: list[list[int]], restorer: Restorer, bar: tqdm, workers: int
) -> None:
    for idx, loaded in _prefetch(jobs, batches, workers):
        good = []
        for i, im in zip(idx, loaded, strict=True):
            if isinstance(im, ImageReadError):
                jobs[i].status, jobs[i].reason = "skipped", str(im)
                tqdm.write(f"skipping {jobs[i].input}: {im}", file=sys.stderr)
                bar.update(1)
            else:
                jobs[i].mode, jobs[i].notes = im.mode, im.notes
                good.append((i, im))
        # A header can disagree with the decoded size (EXIF, odd files): regroup by real size.
        by_size: dict[tuple, list] = {}
        for i, im in good:
            by_size.setdefault(im.rgb.shape, []).append((i, im))
        for group in by_size.values():
            start = time.perf_counter()
            results = restorer([im.rgb for _, im in group])
            per_image = (time.perf_counter() - start) / len(group)
            for (i, im), res in zip(group, results, strict=True):
                job = jobs[i]
                try:
                    write_png(job.output, res.image, like=im)
                except OSError as e:
                    job.status, job.reason = "skipped", f"cannot write {job.output}: {e}"
                    tqdm.write(f"skipping {job.input}: {job.reason}", file=sys.stderr)
                else:
                    job.status, job.size = "restored", im.rgb.shape[:2]
                    job.experts, job.tiles, job.expert_counts = res.experts, res.tiles, res.expert_counts
                    job.seconds = per_image
                bar.update(1)
            bar.set_postfix_str(jobs[group[-1][0]].input.name)


def _write_reports(
    args: argparse.Namespace,
    jobs: list[Job],
    model: moceir.MoCEIR,
    device: torch.device,
    weights: str,
    blocks: list[str],
    outdir: Path,
) -> None:
    header = {
        "moceir_version": moceir.__version__,
        "weights": weights,
        "random_weights": not args.checkpoint,
        "config": {
            "dim": model.config.dim,
            "num_experts": model.config.num_experts,
            "top_k": model.config.top_k,
        },
        "device": str(device),
        "backend": args.backend,
        "precision": args.precision,
        "tile": args.tile,
        "tile_overlap": args.tile_overlap if args.tile else None,
        "decoder_blocks": blocks,
        "experts_note": "expert per decoder block, 0 = cheapest ... E-1 = widest; dec0 = deepest level",
    }
    write_report(
        outdir / args.report_name.with_suffix(".json"),
        outdir / args.report_name.with_suffix(".csv"),
        jobs,
        header,
        blocks,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (searched recursively) or glob patterns",
    )
    parser.add_argument(
        "-o", "--output-dir", required=True, help="folder for the restored PNGs and the report"
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="images of equal size per model call (default 4)"
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=0,
        help="run images larger than N x N in overlapping N x N tiles to bound memory (0: never; "
        "default). Each tile is routed on its own: close to, not equal to, the whole-image result",
    )
    parser.add_argument(
        "--tile-overlap", type=int, default=32, help="overlap of neighbouring tiles in pixels (default 32)"
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each model call from a CUDA graph captured once per input shape (tiles share "
        "one): one launch per call instead of thousands (CUDA and a fast --backend)",
    )
    parser.add_argument("--workers", type=int, default=2, help="threads decoding the next batch (0: none)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing output files (never inputs)"
    )
    parser.add_argument(
        "--allow-inside",
        action="store_true",
        help="allow the output folder inside an input folder (or inputs inside it)",
    )
    parser.add_argument(
        "--no-recursive", action="store_true", help="do not descend into sub-folders of input folders"
    )
    parser.add_argument(
        "--report-name", type=Path, default=Path("report"), help="report file stem (default report)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


DESCRIPTION = """Restore images with MoCE-IR. Writes one PNG per input into OUTPUT_DIR (keeping the
sub-folders of input folders) and report.json / report.csv with the expert each image was routed to
in every decoder block. Unreadable files are skipped and listed; exit status 1 when any input was
skipped, 2 on a usage error."""

EPILOG = """examples:
  moceir restore photo.jpg -o restored/ --checkpoint MoCE_IR_S_AIO3/last.ckpt
  moceir restore scans/ 'more/*.png' -o out/ --checkpoint runs/aio3 --batch-size 8
  moceir restore big.tif -o out/ --checkpoint w.safetensors --tile 512 --tile-overlap 32"""
