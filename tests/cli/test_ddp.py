"""DDP through torchrun (2 CPU processes, gloo) = one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moceir.cli import main
from tests.cli.conftest import TINY_ARGS

REPO = Path(__file__).resolve().parents[2]


def args(data: Path, out: Path, batch: int, accumulation: int) -> list[str]:
    fixed = (
        "--tasks denoise_25 derain lowlight --crop 16 --workers 0 --steps 3 --warmup-steps 1 --quiet "
        "--device cpu --backend reference"
    )
    return [
        "train", "--data", str(data), "--out", str(out), "--batch-size", str(batch),
        "--accumulation", str(accumulation), *fixed.split(), "--model-override", *TINY_ARGS,
    ]  # fmt: skip


def test_two_gloo_processes_match_one_process_bit_for_bit(official_data, tmp_path):
    # One process: 2 micro-batches of 1 image per step. Two processes: 1 image each per step.
    # Per-micro-batch seeds make the data and the routing noise identical; the unused-expert
    # handling (0 * parameters under DDP, grad=None when no image of the global batch chose an
    # expert) must keep the optimiser identical too.
    single = tmp_path / "single"
    assert main(args(official_data, single, batch=1, accumulation=2)) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = "-m torch.distributed.run --standalone --nproc_per_node 2 -m moceir".split()
    cmd = [sys.executable, *torchrun, *args(official_data, ddp, batch=1, accumulation=1)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x2" in proc.stderr  # it really ran two processes
    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    # some expert was unused in some step (else the test would not exercise that path)
    counts = [line.split(",")[8:] for line in (single / "log.csv").read_text().splitlines()[1:]]
    assert any("0" in level.split("/") for row in counts for level in row)
    # the logged losses and routing counts agree too (all columns but the throughput)
    rows = [[r.split(",") for r in (d / "log.csv").read_text().splitlines()[1:]] for d in (single, ddp)]
    assert [r[:7] + r[8:] for r in rows[0]] == [r[:7] + r[8:] for r in rows[1]]


#: Runs `moceir` with --cuda-graph allowed on the CPU, where the Trainer runs the graphed step
#: without a graph (GraphedTrainStep(capture=False): the very step a graph captures), and says
#: on stderr how each rank built it.
_GRAPHED_ON_CPU = """
import sys
import moceir.train as train_mod
from moceir.cli import main

train_mod._check_cuda_graph_device = lambda device: None
real = train_mod.GraphedTrainStep

def recording(*args, **kwargs):
    print(f"graphed step: capture={kwargs['capture']} group={kwargs['process_group'] is not None}",
          file=sys.stderr)
    return real(*args, **kwargs)

train_mod.GraphedTrainStep = recording
sys.exit(main(sys.argv[1:]))
"""


def test_two_gloo_processes_with_the_graphed_step_reach_the_eager_ddp_weights(official_data, tmp_path):
    """--cuda-graph under torchrun: the step averages the gradients over the ranks itself (DDP's
    hooks cannot be replayed by a graph) and sums the routing counts, so an expert that no image
    of the global batch chose stays untouched: the weights of eager DDP, to rounding (the graphed
    step runs the sync-free expert path), and the same logged routing counts."""
    from moce_kernels._backend import is_available  # noqa: PLC0415

    if not is_available("cpu"):
        pytest.skip("moce_kernels._C is not built")
    script = tmp_path / "graphed_on_cpu.py"
    script.write_text(_GRAPHED_ON_CPU)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, *"-m torch.distributed.run --standalone --nproc_per_node 2".split()]
    runs = {}
    for name, launcher, extra in (
        ("eager", ["-m", "moceir"], []),
        ("graphed", [str(script)], ["--cuda-graph"]),
    ):
        out = tmp_path / name
        cli = args(official_data, out, batch=1, accumulation=1)
        cli[cli.index("reference")] = "cpu"  # --cuda-graph needs a fast backend
        proc = subprocess.run(
            [*torchrun, *launcher, *cli, *extra],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "x2" in proc.stderr
        runs[name] = (out, proc.stderr)
    assert runs["graphed"][1].count("graphed step: capture=False group=True") == 2  # one per rank
    eager, graphed = (load_file(str(runs[n][0] / "model.safetensors")) for n in ("eager", "graphed"))
    assert eager.keys() == graphed.keys()
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    logs = [(runs[n][0] / "log.csv").read_text().splitlines()[1:] for n in ("eager", "graphed")]
    counts = [[row.split(",")[8:] for row in log] for log in logs]
    assert counts[0] == counts[1]
    assert any("0" in level.split("/") for row in counts[0] for level in row)  # an expert went unused
