"""``moceir train`` killed with SIGKILL (no handler runs, no checkpoint is finished) resumes to the
same weights, bit for bit, as a run that was never interrupted.

A tiny MoCE-IR trains 12 steps on a miniature of the official layout (the helpers of
``tests/cli/test_train.py``), saving a checkpoint after every step. The run is started as a
subprocess and SIGKILLed twice: once in the first run, once in its first resume, each time at a
step drawn from a seeded RNG (after the checkpoint of that step has been published) plus a
random fraction of a step, so the kill can land in a forward, a backward, or in the middle of
writing the next checkpoint. A last resume finishes the run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moceir.cli import main
from moceir.train import read_training_checkpoint
from tests.cli.conftest import write_official_layout
from tests.cli.test_train import assert_same, train_args, weights

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
SEED = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The killed runs are subprocesses with one thread; the in-process runs match them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_official_layout(tmp_path_factory.mktemp("data"))


def latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (FileNotFoundError, IndexError, ValueError):  # not written yet, or being replaced
        return 0


def start_and_kill(args: list[str], out: Path, kill_after: int, fraction: float) -> tuple[int, str, float]:
    """Run ``python -m moceir <args>`` and SIGKILL it ``fraction`` of a step after checkpoint
    ``kill_after`` is published (a step's time: between the last two checkpoints it saw
    published; 0 when it saw only one). Returns (returncode, stderr, delay)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moceir", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        published: dict[int, float] = {}  # step -> when it was first seen published
        step = 0
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            step = latest_step(out)
            published.setdefault(step, time.monotonic())
            if step >= kill_after:
                break
            time.sleep(0.002)
        step_time = published.get(step, 0.0) - published.get(step - 1, published.get(step, 0.0))
        delay = fraction * step_time
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before the kill (step {latest_step(out)})"
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, delay


def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_weights(data, tmp_path):
    rng = random.Random(SEED)
    full = tmp_path / "full"
    assert main(train_args(data, full, steps=STEPS)) == 0

    out = tmp_path / "killed"
    args = train_args(data, out, "--save-every", "1", steps=STEPS)
    kills = []
    for attempt in range(2):
        resumed_from = latest_step(out)
        # Two steps seen before the kill (to time one), room for a second kill after the first,
        # three steps left after the second.
        kill_after = rng.randint(resumed_from + 2, STEPS // 2 - 1 if attempt == 0 else STEPS - 3)
        extra = ["--resume"] if attempt else []
        code, err, delay = start_and_kill([*args, *extra], out, kill_after, rng.random())
        assert code == -signal.SIGKILL, err
        assert "Traceback" not in err, err
        reached = latest_step(out)
        kills.append({"after_checkpoint": kill_after, "delay_s": round(delay, 3), "latest": reached})
        assert resumed_from < kill_after <= reached < STEPS, kills
        # What the kill left behind: the published checkpoint is complete and readable.
        _, _, meta = read_training_checkpoint(out / "checkpoints" / f"step_{reached:08d}")
        assert meta["step"] == reached
        assert not (out / "model.safetensors").exists()

    print(f"kills: {kills}")  # shown with pytest -s / -rP
    assert main([*args, "--resume"]) == 0, kills
    assert_same(weights(out / "model.safetensors"), weights(full / "model.safetensors"))
    _, resumed, _ = read_training_checkpoint(out / "checkpoints" / f"step_{STEPS:08d}")
    _, uninterrupted, _ = read_training_checkpoint(full / "checkpoints" / f"step_{STEPS:08d}")
    assert_same(resumed, uninterrupted)  # AdamW moments and step counts too
    # A kill between a step's log row and its checkpoint logged that step twice before the
    # resume dropped rows past the checkpoint (and a row torn by the kill).
    log = (out / "log.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in log[1:]] == list(range(1, STEPS + 1)), kills
