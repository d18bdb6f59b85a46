"""Render the benchmark result files into benchmarks/RESULTS.md and PNG plots.

    python -m benchmarks.report [--results benchmarks/results] [--output benchmarks/RESULTS.md]
                                [--plots benchmarks/plots]
    python -m benchmarks.report --summary OUTDIR    # the closing table of device_check.sh

For every device (name and type), the latest run of each suite (ops, models) gives the tables:
per op, each provider's median time, speed-up over the reference of the same run and the
fraction of the roofline (the ceilings measured in that run); per model workload, each
backend's time against the eager and the compiled reference, peak memory, and for the video
frame the frames/s, bytes per frame and where the time goes. Every run is listed with its
device, versions and commit. Only measured numbers appear: nothing is extrapolated.
Needs only the standard library (and matplotlib for the plots).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PROVIDER_ORDER = ("reference", "compiled-reference", "auto", "compiled-auto", "triton", "cuda", "cpu")
MODES = ("forward", "backward", "full")
WORKLOADS = ("video", "training", "inference", "adapter")
#: ||got - ref|| / ||ref|| above this marks a provider's output as wrong in the tables.
TOLERANCE = {"float32": 1e-3, "float64": 1e-6, "bfloat16": 3e-2, "float16": 1e-2}


@dataclass
class Run:
    path: Path
    data: dict

    @property
    def env(self) -> dict:
        return self.data.get("environment", {})

    @property
    def device_key(self) -> tuple[str, str]:
        return (self.env.get("device_type", "?"), self.env.get("device", "?"))

    @property
    def date(self) -> str:
        return self.env.get("date", "")

    @property
    def rows(self) -> list[dict]:
        return self.data.get("results", [])

    def suite_rows(self, suite: str) -> list[dict]:
        return [r for r in self.rows if r.get("suite") == suite]


def load_runs(folder: Path) -> list[Run]:
    """Every readable result file under ``folder`` (others are reported on stderr and skipped)."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"report: skipping {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "results" not in data or "environment" not in data:
            print(f"report: skipping {path}: not a benchmark result file", file=sys.stderr)
            continue
        runs.append(Run(path, data))
    return runs


def latest_by_device(runs: list[Run]) -> dict[tuple[str, str], dict[str, Run]]:
    """{device: {suite: the latest run with rows of that suite}}; a ``--tiny`` run (a plumbing
    check) only where no run of real sizes exists."""
    out: dict[tuple[str, str], dict[str, Run]] = defaultdict(dict)
    for run in sorted(runs, key=lambda r: (r.data.get("size") != "tiny", r.date)):
        for suite in ("ops", "models"):
            if run.suite_rows(suite):
                out[run.device_key][suite] = run
    return dict(out)


def _row_key(suite: str, r: dict) -> tuple:
    if suite == "ops":
        return (r.get("op"),)
    return (r.get("workload"), r.get("case"), r.get("precision"))


def runs_by_device(runs: list[Run]) -> dict[tuple[str, str], dict[str, list[Run]]]:
    """{device: {suite: runs, newest first}}: each op (each model workload) is shown from the
    newest run that measured it, so a partial re-run (``--ops layernorm2d``) adds to the
    earlier full run instead of hiding it. Each returned run holds only the rows it shows."""
    out: dict[tuple[str, str], dict[str, list[Run]]] = defaultdict(dict)
    for device, suites in latest_by_device(runs).items():
        candidates = [r for r in runs if r.device_key == device]
        real = [r for r in candidates if r.data.get("size") != "tiny"] or candidates
        newest_first = sorted(real, key=lambda r: r.date, reverse=True)
        for suite in suites:
            owner: dict[tuple, Run] = {}
            for run in newest_first:  # the newest run with a measured row of the key owns it
                for r in run.suite_rows(suite):
                    if r.get("status") == "ok":
                        owner.setdefault(_row_key(suite, r), run)
            for run in newest_first:  # keys never measured: the newest run that has them
                for r in run.suite_rows(suite):
                    owner.setdefault(_row_key(suite, r), run)
            shown = []
            for run in newest_first:
                rows = [r for r in run.rows if r.get("suite") != suite or owner[_row_key(suite, r)] is run]
                if any(r.get("suite") == suite for r in rows):
                    shown.append(Run(run.path, {**run.data, "results": rows}))
            out[device][suite] = shown
    return dict(out)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def provider_sort(names) -> list[str]:
    known = [p for p in PROVIDER_ORDER if p in names]
    return known + sorted(set(names) - set(known))


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def speedup(row: dict | None, base: dict | None) -> float | None:
    if not row or not base or row.get("status") != "ok" or base.get("status") != "ok":
        return None
    return base["median_ms"] / row["median_ms"]


def wrong(row: dict) -> bool:
    err = row.get("rel_err")
    if err is None:
        return False
    return not err <= TOLERANCE.get(row.get("dtype", "float32"), 1e-3)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


def op_groups(run: Run) -> dict[str, dict[tuple, dict[str, dict]]]:
    """{op: {(case, shape, dtype, mode): {provider: row}}} in run order."""
    groups: dict[str, dict[tuple, dict[str, dict]]] = defaultdict(dict)
    for r in run.suite_rows("ops"):
        key = (r["case"], tuple(r.get("shape", ())), r.get("dtype", ""), r.get("mode", ""))
        groups[r["op"]].setdefault(key, {})[r["provider"]] = r
    return groups


def op_cell(row: dict | None, ref: dict | None) -> str:
    if row is None:
        return "–"
    if row.get("status") != "ok":
        return row.get("status", "?")
    parts = [fmt_ms(row["median_ms"])]
    s = speedup(row, ref)
    if row["provider"] != "reference" and s is not None:
        parts.append(f"**{s:.2f}x**")
    if row.get("roofline_fraction") is not None:
        parts.append(f"{fmt_pct(row['roofline_fraction'])} roof")
    cell = " · ".join(parts)
    if wrong(row):
        cell += f" ⚠ err {row['rel_err']:.1e}"
    return cell


def op_summary(run: Run) -> list[list[str]]:
    """Per op and fast provider: geometric-mean speed-up over the reference (all cases, modes)."""
    rows = []
    for op, groups in op_groups(run).items():
        by_provider: dict[str, list[float]] = defaultdict(list)
        best_roof: dict[str, float] = {}
        for cells in groups.values():
            for provider, row in cells.items():
                s = speedup(row, cells.get("reference"))
                if provider != "reference" and s is not None:
                    by_provider[provider].append(s)
                    if row.get("roofline_fraction") is not None:
                        best_roof[provider] = max(best_roof.get(provider, 0.0), row["roofline_fraction"])
        if not by_provider:
            rows.append([f"`{op}`", "reference only", "–", "–", "–"])
        for provider in provider_sort(by_provider):
            v = by_provider[provider]
            rows.append(
                [
                    f"`{op}`",
                    provider,
                    f"{geomean(v):.2f}x",
                    f"{min(v):.2f}x – {max(v):.2f}x",
                    fmt_pct(best_roof.get(provider)),
                ]
            )
    return rows


def ops_section(run: Run, plot: str | None) -> list[str]:
    env = run.env
    out = [
        f"### Ops ({run.date}, commit `{str(env.get('commit', '?'))[:12]}`, "
        f"sizes: {run.data.get('size', '?')})",
        "",
        "Each cell: median time · speed-up over the reference of the same run · fraction of the "
        "roofline (bytes over the measured copy bandwidth, or flops over the matmul rate, whichever "
        "is larger). ⚠ marks an output or gradient that differs from the reference's beyond "
        "float tolerance. Modes: forward (no autograd), backward (from a retained graph), full (both).",
        "",
        "Summary (geometric mean of the speed-ups over every case, dtype and mode):",
        "",
        *_table(["op", "provider", "speed-up", "range", "best % roofline"], op_summary(run)),
        "",
    ]
    if plot:
        out += [f"![op speed-ups]({plot})", ""]
    unavailable = run.data.get("unavailable", {})
    for op, groups in op_groups(run).items():
        providers = provider_sort({p for cells in groups.values() for p in cells})
        header = ["case", "shape", "dtype", "mode", "bytes", *providers]
        body = []
        for (case, shape, dtype, mode), cells in groups.items():
            ref = cells.get("reference")
            moved = next((c.get("bytes") for c in cells.values() if c.get("bytes")), None)
            body.append(
                [case, "x".join(map(str, shape)), dtype, mode, fmt_bytes(moved)]
                + [op_cell(cells.get(p), ref) for p in providers]
            )
        out += [f"#### `{op}`", "", *_table(header, body), ""]
        why = unavailable.get(op) or {}
        if why:
            out += ["Not measured: " + "; ".join(f"{b}: {w}" for b, w in why.items()), ""]
    return out


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def model_groups(run: Run) -> dict[str, dict[tuple, dict[str, dict]]]:
    groups: dict[str, dict[tuple, dict[str, dict]]] = defaultdict(dict)
    for r in run.suite_rows("models"):
        key = (r["case"], r.get("precision", ""), tuple(r.get("scaled_from") or ()))
        groups[r["workload"]].setdefault(key, {})[r["provider"]] = r
    return groups


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


def _peak_mib(provider: str, row: dict) -> str:
    # A graph replay allocates nothing: a graphed row's peak means something only when it counts
    # the graph's pool ("peak_kind": "reserved", written since the benchmarks measure it so).
    if provider.startswith("graphed") and row.get("peak_bytes") is not None and "peak_kind" not in row:
        return "n/c"
    return _mib(row.get("peak_bytes"))


def models_section(run: Run, plot: str | None) -> list[str]:
    env = run.env
    model_names = sorted({r.get("model", "moce_ir_s") for r in run.suite_rows("models")})
    out = [
        f"### Model: {', '.join(model_names)} ({run.date}, commit `{str(env.get('commit', '?'))[:12]}`, "
        f"sizes: {run.data.get('size', '?')})",
        "",
        "Speed-ups are against the eager reference backend and against `torch.compile` of the "
        "reference, measured in the same run. Peak memory: `max_memory_allocated` over one call (GPU); "
        "for a CUDA graph, the memory reserved while it is held (its private pool included). Older runs "
        "counted only a graph replay's own allocations, which leave out the pool: those peaks read "
        "`n/c` (not comparable).",
        "",
    ]
    if plot:
        out += [f"![model speed-ups]({plot})", ""]
    groups = model_groups(run)
    for workload in sorted(groups, key=lambda w: WORKLOADS.index(w) if w in WORKLOADS else 99):
        video = workload == "video"
        rate = "frames/s" if video else "images/s"
        header = [
            "case",
            "precision",
            "provider",
            "median",
            rate,
            "vs eager ref",
            "vs compiled ref",
            "peak MiB",
        ]
        if video:
            header += ["bytes/frame", "copy-bound frames/s", "% roofline"]
        body = []
        for (case, precision, scaled), cells in groups[workload].items():
            ref, comp = cells.get("reference"), cells.get("compiled-reference")
            label = case + (f" (scaled from {scaled[0]}x{scaled[1]})" if scaled else "")
            for provider in provider_sort(cells):
                r = cells[provider]
                if r.get("status") != "ok":
                    line = [label, precision, provider, r.get("status", "?"), "–", "–", "–", "–"]
                    body.append(line + (["–", "–", "–"] if video else []))
                    continue
                s_ref, s_comp = speedup(r, ref), speedup(r, comp)
                line = [
                    label,
                    precision,
                    provider,
                    fmt_ms(r["median_ms"]),
                    f"{r.get('frames_per_s' if video else 'images_per_s', 0):.2f}",
                    "–" if s_ref is None else f"{s_ref:.2f}x",
                    "–" if s_comp is None else f"{s_comp:.2f}x",
                    _peak_mib(provider, r),
                ]
                if video:
                    bb = r.get("bandwidth_bound_fps")
                    line += [
                        fmt_bytes(r.get("bytes_per_frame")),
                        "–" if bb is None else f"{bb:.1f}",
                        fmt_pct(r.get("roofline_fraction")),
                    ]
                body.append(line)
        out += [f"#### {workload}", "", *_table(header, body), ""]
        out += tuned_notes(groups[workload])
        if video:
            out += breakdown_tables(groups[workload])
    why = run.data.get("unavailable", {}).get("moce_ir_s") or {}
    if why:
        out += ["Not measured: " + "; ".join(f"{b}: {w}" for b, w in why.items()), ""]
    return out


#: How the report names the layer kinds and candidates of benchmark mode (moceir.layers.tuning).
_TUNED_NAMES = {
    "pointwise": "1x1",
    "depthwise": "depthwise",
    "kernel": "ours",
    "cudnn": "cuDNN",
    "triton": "ours (Triton)",
    "cublas": "cuBLAS GEMM",
}


def tuned_notes(groups: dict[tuple, dict[str, dict]]) -> list[str]:
    """One line per benchmark-mode row: which candidate each layer kind's shapes chose."""
    lines = []
    for (case, precision, _), cells in groups.items():
        for provider in provider_sort(cells):
            choices = cells[provider].get("tuned_choices")
            if not choices:
                continue
            parts = []
            for kind, counts in sorted(choices.items()):
                if kind == "ms":
                    continue
                said = ", ".join(f"{_TUNED_NAMES.get(c, c)} {n}" for c, n in sorted(counts.items()))
                parts.append(f"{_TUNED_NAMES.get(kind, kind)}: {said}")
            lines.append(f"- {provider}, {case} {precision}: shapes per choice, " + "; ".join(parts))
            for kind, sums in sorted(choices.get("ms", {}).items()):
                said = ", ".join(f"{_TUNED_NAMES.get(c, c)} {ms:.3f} ms" for c, ms in sorted(sums.items()))
                lines.append(
                    f"  - {_TUNED_NAMES.get(kind, kind)}, every candidate timed on every shape: {said}"
                )
    return ["Benchmark-mode choices:", "", *lines, ""] if lines else []


def breakdown_tables(groups: dict[tuple, dict[str, dict]], top: int = 12) -> list[str]:
    out = []
    for (case, precision, _), cells in groups.items():
        have = {p: r["breakdown"] for p, r in cells.items() if r.get("status") == "ok" and r.get("breakdown")}
        if not have:
            continue
        providers = provider_sort(have)
        first = have[providers[0]]
        order = [c["category"] for c in first["categories"]]
        for p in providers[1:]:
            order += [c["category"] for c in have[p]["categories"] if c["category"] not in order]
        shown, rest = order[:top], order[top:]
        body = []
        for cat in shown:
            line = [cat]
            for p in providers:
                hit = next((c for c in have[p]["categories"] if c["category"] == cat), None)
                line.append("–" if hit is None else f"{fmt_ms(hit['ms'])} ({fmt_pct(hit['share'])})")
            body.append(line)
        if rest:
            line = [f"{len(rest)} others"]
            for p in providers:
                ms = sum(c["ms"] for c in have[p]["categories"] if c["category"] in rest)
                total = have[p]["total_ms"] or 1.0
                line.append(f"{fmt_ms(ms)} ({fmt_pct(ms / total)})")
            body.append(line)
        body.append(["**total (one timed call)**", *[fmt_ms(have[p]["total_ms"]) for p in providers]])
        out += [
            f"Where the time goes, {case} {precision} (self time per module type or kernel op, one call "
            "with a timestamp around each):",
            "",
            *_table(["category", *providers], body),
            "",
        ]
    return out


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    return plt


def _speedup_axis(ax, values: list[float]) -> None:
    """A log axis when the speed-ups span a decade or more, else linear; ticks read '2x'."""
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415

    ax.axvline(1.0, color="black", linewidth=0.8)
    if values and max(values) / min(values) >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(left=0)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))


def _speedup_bars(ax, providers: list[str], rows: list[dict], height: float, fontsize: int) -> None:
    """One horizontal bar per (row, provider): its speed-up over the row's reference, labelled."""
    shown: list[float] = []
    for j, provider in enumerate(providers):
        ys, xs = [], []
        for i, cells in enumerate(rows):
            s = speedup(cells.get(provider), cells.get("reference"))
            if s is not None:
                ys.append(i + j * height)
                xs.append(s)
        bars = ax.barh(ys, xs, height=height, label=provider)
        ax.bar_label(bars, labels=[f"{x:.3g}x" for x in xs], fontsize=fontsize, padding=2)
        shown += xs
    _speedup_axis(ax, shown)


def plot_ops(run: Run, path: Path, title: str) -> bool:
    """Speed-up over the reference per op case, one panel per mode. False when nothing to plot."""
    plt = _pyplot()
    groups = op_groups(run)
    providers = provider_sort(
        {p for g in groups.values() for cells in g.values() for p in cells if p != "reference"}
    )
    if plt is None or not providers:
        return False
    modes = [m for m in MODES if any(k[3] == m for g in groups.values() for k in g)]
    labels = [
        f"{op} {case} {dtype}" for op, g in groups.items() for (case, _, dtype, mode) in g if mode == modes[0]
    ]
    fig, axes = plt.subplots(
        1, len(modes), figsize=(5 * len(modes), 1 + 0.32 * len(labels)), sharey=True, squeeze=False
    )
    height = 0.8 / len(providers)
    for ax, mode in zip(axes[0], modes, strict=True):
        cases = [(op, key, cells) for op, g in groups.items() for key, cells in g.items() if key[3] == mode]
        _speedup_bars(ax, providers, [cells for _, _, cells in cases], height, fontsize=6)
        ax.set_title(mode)
        ax.set_xlabel("speed-up over the reference")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
        ax.set_yticklabels([f"{op} {k[0]} {k[2]}" for op, k, _ in cases], fontsize=7)
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_models(run: Run, path: Path, title: str) -> bool:
    """Speed-up over the eager reference per workload and backend."""
    plt = _pyplot()
    groups = model_groups(run)
    rows = [(w, key, cells) for w, g in groups.items() for key, cells in g.items()]
    providers = provider_sort({p for _, _, cells in rows for p in cells if p != "reference"})
    if plt is None or not providers or not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 1 + 0.45 * len(rows)))
    height = 0.8 / len(providers)
    _speedup_bars(ax, providers, [cells for _, _, cells in rows], height, fontsize=7)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))])
    ax.set_yticklabels([f"{w} {k[0]} {k[1]}" for w, k, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the eager reference")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def run_header(run: Run) -> list[str]:
    env, ceil = run.env, run.data.get("ceilings", {})
    rates = ", ".join(f"{k} {v:.3g}" for k, v in (ceil.get("matmul_tflops") or {}).items())
    load = env.get("loadavg")
    lines = [
        f"- device: **{env.get('device', '?')}** ({env.get('device_type', '?')}"
        + (f", capability {env['capability']}" if env.get("capability") else "")
        + f"), {env.get('threads', '?')} thread{'' if env.get('threads') == 1 else 's'}"
        + (f", load average at start {load[0]:.1f}" if load else ""),
        f"- torch {env.get('torch', '?')}, Triton {env.get('triton') or 'none'}, "
        f"CUDA {env.get('cuda') or 'none'}, Python {env.get('python', '?')}; {env.get('build', '')}",
        f"- commit `{env.get('commit', '?')}`"
        + (" (with uncommitted changes)" if env.get("dirty") else "")
        + f", sources {env.get('source_sha', '?')}, {run.date}",
        f"- ceilings measured in the run: copy {ceil.get('copy_gb_per_s', float('nan')):.1f} GB/s "
        f"(read + write), matmul TFLOP/s: {rates or '–'}",
    ]
    if env.get("device_type") == "cpu":
        lines.append(
            "- CPU: timings are not cache-flushed, and many working sets fit in the caches while the "
            "copy bandwidth is measured through memory, so a roofline fraction above 100% is a cache "
            "effect; a shared machine's load shows as noise (compare the p20/p80 in the JSON)"
        )
    if not run.data.get("complete", True):
        lines.append(
            "- **incomplete run** (stopped by its time budget or interrupted): missing rows were not measured"
        )
    return lines


def render(runs: list[Run], plots_dir: Path | None, md_dir: Path) -> str:
    out = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; do not edit by "
        "hand. For every device, the latest run of each suite. Numbers from different runs or "
        "devices are not comparable.",
        "",
    ]
    if not runs:
        return "\n".join([*out, "No result files yet: run `python -m benchmarks.run`.", ""])
    shown = runs_by_device(runs)
    for (device_type, device), suites in sorted(shown.items()):
        out += [f"## {device} ({device_type})", ""]
        for suite in ("ops", "models"):
            for i, run in enumerate(suites.get(suite, [])):
                out += [f"Run `{run.path.name}`:", "", *run_header(run), ""]
                plot_rel = None
                if plots_dir is not None:
                    part = "" if i == 0 else f"-{i + 1}"
                    png = plots_dir / f"{slug(device_type + '-' + device)}-{suite}{part}.png"
                    plotter = plot_ops if suite == "ops" else plot_models
                    if plotter(run, png, f"{device} ({device_type}): {suite}"):
                        try:
                            plot_rel = png.resolve().relative_to(md_dir.resolve()).as_posix()
                        except ValueError:
                            plot_rel = png.resolve().as_posix()
                out += ops_section(run, plot_rel) if suite == "ops" else models_section(run, plot_rel)
    out += ["## Every run", ""]
    body = []
    for run in sorted(runs, key=lambda r: r.date, reverse=True):
        env = run.env
        rows = run.rows
        body.append(
            [
                f"`{run.path.name}`",
                run.date,
                f"{env.get('device', '?')} ({env.get('device_type', '?')})",
                ", ".join(run.data.get("suites", [])),
                str(run.data.get("size", "?")),
                f"{env.get('torch', '?')} / {env.get('triton') or '–'}",
                f"`{str(env.get('commit', '?'))[:12]}`",
                f"{sum(r.get('status') == 'ok' for r in rows)}/{len(rows)}"
                + ("" if run.data.get("complete", True) else " (incomplete)"),
            ]
        )
    out += _table(["file", "date", "device", "suites", "sizes", "torch / triton", "commit", "rows ok"], body)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# The device check's closing table
# ----------------------------------------------------------------------------------------------


def junit_counts(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return ""
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return (
        f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped"
    )


def summary_table(outdir: Path) -> str:
    """Stages, ceilings, per-op best speed-ups and model numbers of a device check, as text."""
    lines = []
    stages = outdir / "stages.tsv"
    if stages.exists():
        lines.append(f"{'stage':<14} {'status':<24} {'seconds':>7}  note")
        for line in stages.read_text().splitlines():
            name, status, seconds, *note = [*line.split("\t"), ""]
            junit = outdir / "results" / f"pytest-{name}.xml"
            extra = junit_counts(junit) if junit.exists() else ""
            note = extra or " ".join(note).strip()
            lines.append(
                f"{name:<14} {status:<24} {seconds:>7}  {note[:70] + ('...' if len(note) > 70 else '')}"
            )
    runs = load_runs(outdir / "results")
    for (device_type, device), suites in sorted(latest_by_device(runs).items()):
        first = next(iter(suites.values()))
        ceil = first.data.get("ceilings", {})
        rates = ", ".join(f"{k} {v:.3g}" for k, v in (ceil.get("matmul_tflops") or {}).items())
        env = first.env
        lines += [
            "",
            f"{device} ({device_type}) | torch {env.get('torch')} | triton {env.get('triton')} | "
            f"commit {str(env.get('commit', '?'))[:12]}",
            f"copy {ceil.get('copy_gb_per_s', float('nan')):.0f} GB/s | matmul TFLOP/s {rates}",
        ]
        if "ops" in suites:
            lines.append(f"{'op':<16} {'provider':<10} {'speed-up (geomean, range)':<28} best % roofline")
            for op, provider, gm, rng, roof in op_summary(suites["ops"]):
                lines.append(f"{op.strip('`'):<16} {provider:<10} {gm + ' (' + rng + ')':<28} {roof}")
        if "models" in suites:
            lines.append(
                f"{'workload':<34} {'provider':<19} {'median':>10} {'vs ref':>7} {'vs comp':>8}  rate"
            )
            for workload, groups in model_groups(suites["models"]).items():
                for (case, precision, _), cells in groups.items():
                    for provider in provider_sort(cells):
                        r = cells[provider]
                        label = f"{workload} {case} {precision}"
                        if r.get("status") != "ok":
                            lines.append(f"{label:<34} {provider:<19} {r.get('status'):>10}")
                            continue
                        s1 = speedup(r, cells.get("reference"))
                        s2 = speedup(r, cells.get("compiled-reference"))
                        rate = (
                            f"{r['frames_per_s']:.2f} frames/s"
                            if r.get("frames_per_s")
                            else f"{r['images_per_s']:.1f} img/s"
                        )
                        vs_ref = "" if s1 is None else f"{s1:.2f}x"
                        vs_comp = "" if s2 is None else f"{s2:.2f}x"
                        lines.append(
                            f"{label:<34} {provider:<19} {fmt_ms(r['median_ms']):>10} "
                            f"{vs_ref:>7} {vs_comp:>8}  {rate}"
                        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    here = Path(__file__).resolve().parent
    parser.add_argument("--results", type=Path, default=here / "results")
    parser.add_argument("--output", type=Path, default=here / "RESULTS.md")
    parser.add_argument("--plots", type=Path, default=here / "plots")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--summary", type=Path, metavar="OUTDIR", help="print a device check's closing table")
    args = parser.parse_args(argv)
    if args.summary is not None:
        print(summary_table(args.summary))
        return 0
    runs = load_runs(args.results)
    text = render(runs, None if args.no_plots else args.plots, args.output.parent)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} from {len(runs)} result file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
