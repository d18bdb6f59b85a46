"""``moceir train``: the paper's recipe, resumable to the bit, one process or DDP via torchrun.

Recipe (defaults): AdamW lr 2e-4, linear warm-up (15 epochs) then cosine to 0 (150 epochs),
128 x 128 random crops with the 8 flips/rotations, loss ``L1 + 0.1 FFT-L1 + 0.01 routing``,
complexity bias on (the model's default), tasks balanced by repetition as the official code.

Determinism: the data stream is a function of ``(seed, sample position)`` (see
``moceir.data.training``) and the routing noise of every micro-batch is drawn after
``torch.manual_seed(f(seed, step, micro-batch))``. A checkpoint therefore only needs the step,
the model and the optimiser: ``--resume`` continues exactly, and ``torchrun --nproc_per_node W``
with ``--accumulation A`` computes what one process computes with ``--accumulation W*A``.

Experts that no image chose: the model leaves them out of the graph (no gradient). An expert
that no image of the whole global batch chose gets ``grad = None`` after the reduction, so AdamW
leaves it untouched (no weight decay, no moment update): the single-GPU semantics, also under
DDP. Under DDP each rank adds ``0 * (one element of every expert parameter)`` to its loss so
that every parameter's gradient hook fires (no ``find_unused_parameters``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

import moce_kernels
import moceir
from moceir.checkpoint import read_state_dict, save_checkpoint
from moceir.config import CONFIG_FIELDS, CONFIGS
from moceir.cuda_graphs import DeviceLossScaler, GraphedTrainStep
from moceir.data.layouts import (
    TASK_ALIASES,
    TASKS,
    TRAIN_LAYOUTS,
    DatasetLayoutError,
    canonical_task,
    describe_layouts,
)
from moceir.data.training import MicroBatchDataset, TrainingStream, fingerprint, training_items
from moceir.losses import LossWeights, restoration_loss
from moceir.runtime import CLIError, resolve_device

TRAINER_FORMAT = "moceir-train-1"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Recipe:
    """Everything that defines the computation of a run; a resumed run must keep it."""

    config: str = "moce_ir_s"
    model_overrides: dict = field(default_factory=dict)
    tasks: list[str] = field(
        default_factory=lambda: ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"]
    )
    crop: int = 128
    global_batch: int = 8
    lr: float = 2e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    total_steps: int = 1
    l1_weight: float = 1.0
    fft_weight: float = 0.1
    aux_weight: float = 0.01
    clip_grad: float = 0.0
    amp: str = "none"
    seed: int = 0
    data_fingerprint: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Recipe:
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        d["model_overrides"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in d.get("model_overrides", {}).items()
        }
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up from ``lr / warmup`` to ``lr`` over ``warmup_steps``, then cosine to ``min_lr``
    at ``total_steps``. ``step`` counts from 0 (the step about to run)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.total_steps - recipe.warmup_steps)
    t = min(1.0, (step - recipe.warmup_steps) / span)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1.0 + math.cos(math.pi * t))


def noise_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the routing noise of micro-batch ``micro`` (global index) at ``step``."""
    return int(np.random.SeedSequence([seed, 77, step, micro]).generate_state(1, np.uint64)[0] >> 1)


# --- distributed -----------------------------------------------------------------------------


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_arg)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = resolve_device("cpu" if device_arg == "auto" else device_arg)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(world, rank, local), device


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Every rank's weights and buffers := rank 0's (what DistributedDataParallel does when built)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)


# --- checkpoints -----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors ``optim/<param index>/<name>`` plus JSON for the rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{name}"] = value
    groups = [{k: _group_value(k, v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _group_value(key: str, value):
    """A param-group setting as JSON. The ``cuda_graph`` mode's device-tensor lr is saved as a
    number and ``capturable`` as False: how a step runs is not state, and a resumed run (graph
    or not, CPU or GPU) sets them again."""
    if key == "capturable":
        return False
    if isinstance(value, torch.Tensor):
        return float(value)
    return list(value) if isinstance(value, tuple) else value


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_training_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    recipe: Recipe,
    extra: dict,
    keep: int = 3,
) -> Path:
    """Write ``checkpoints/step_<step>/`` (model.safetensors + trainer.safetensors) into a hidden
    temporary folder, rename it into place, then point ``checkpoints/latest`` at it (atomic
    rename too). An interruption at any moment leaves the previous checkpoint and pointer intact."""
    ckpts = out_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpts / name
    if not final.exists():
        tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=f".{name}."))
        try:
            save_checkpoint(model, tmp / "model.safetensors")
            tensors, optim_meta = optimizer_to_tensors(optimizer)
            meta = {
                "format": TRAINER_FORMAT,
                "step": step,
                "recipe": recipe.to_json(),
                "optimizer": optim_meta,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "param_names": [n for n, _ in model.named_parameters()],
                **extra,
            }
            save_file(
                tensors, str(tmp / "trainer.safetensors"), metadata={"moceir_trainer": json.dumps(meta)}
            )
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(ckpts)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    fd, tmp_ptr = tempfile.mkstemp(dir=ckpts, prefix=".latest.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_ptr, ckpts / "latest")
    finally:
        if os.path.exists(tmp_ptr):
            os.unlink(tmp_ptr)
    old = sorted(p for p in ckpts.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (its ``checkpoints/latest``) or a checkpoint folder."""
    if (path / "trainer.safetensors").is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return path / "checkpoints" / latest.read_text().strip()
    raise CLIError(f"no checkpoint to resume in {path} (expected {latest} or {path}/trainer.safetensors)")


def truncate_log(path: Path, step: int) -> int:
    """Drop the rows of ``log.csv`` past ``step`` (the checkpoint a run resumes from), and a row
    torn by a kill mid-write. A step's row is written before its checkpoint and checkpoints may
    be sparser than log rows, so a run killed in between would log those steps again after
    resuming. Rewrites the file atomically; returns the number of rows dropped."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    if not lines or not lines[0].endswith("\n"):  # no complete header: start the log afresh
        path.unlink()
        return max(0, len(lines) - 1)
    keep = lines[:1]
    for line in lines[1:]:
        first = line.split(",", 1)[0]
        if line.endswith("\n") and first.isdigit() and int(first) <= step:
            keep.append(line)
    dropped = len(lines) - len(keep)
    if dropped:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


def read_training_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model state, optimizer tensors, metadata) of a checkpoint folder; CLIError if damaged."""
    trainer = ckpt / "trainer.safetensors"
    try:
        with safe_open(str(trainer), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("moceir_trainer", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iteration)
        state = read_state_dict(ckpt / "model.safetensors")
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise CLIError(f"cannot read checkpoint {ckpt}: {e}") from e
    if meta.get("format") != TRAINER_FORMAT:
        raise CLIError(f"{trainer} is not a moceir training checkpoint (format {meta.get('format')!r})")
    return state, tensors, meta


# --- the trainer -----------------------------------------------------------------------------


class StopRequest:
    """First Ctrl-C (or SIGTERM): finish the step, save, exit. Second Ctrl-C: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(
            "stop requested: finishing this step and saving a checkpoint (Ctrl-C again aborts)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_cuda_graph_device(device: torch.device) -> None:
    # The Trainer itself runs its cuda_graph mode on a CPU as the same step without a graph
    # (GraphedTrainStep(capture=False), for tests); the command line promises a graph.
    if device.type != "cuda":
        raise CLIError(f"--cuda-graph needs a CUDA device, got --device {device}")


def _check_cuda_graph_training(model: moceir.MoCEIR, compile_model: bool) -> None:
    """What a training step captured in a CUDA graph cannot do, said before anything runs."""
    problems = []
    if model.backend == "reference":
        problems.append("a fast --backend (the reference reads routing counts on the host)")
    if compile_model:
        problems.append("no --compile (use one or the other)")
    if problems:
        raise CLIError("--cuda-graph needs " + ", ".join(problems))


class Trainer:
    """One training run: model, optimiser, data stream, schedule, checkpoints, logs.

    ``step()`` runs one optimiser step over ``accumulation`` micro-batches; ``fit()`` loops to
    ``recipe.total_steps`` with a progress bar, logging and checkpoints. ``cuda_graph``: the
    step (forward, loss, backward, clipping, AdamW) is captured in a CUDA graph on the first
    batch and replayed (``moceir.cuda_graphs.GraphedTrainStep``: the sync-free expert path,
    experts no image chose left untouched as here); on a CPU the same step runs without a graph.
    """

    def __init__(
        self,
        model: moceir.MoCEIR,
        stream: TrainingStream,
        recipe: Recipe,
        device: torch.device,
        out_dir: Path | None = None,
        dist_info: Dist | None = None,
        workers: int = 0,
        save_every: int = 1000,
        keep: int = 3,
        log_every: int = 10,
        tensorboard: bool = True,
        progress: bool = True,
        compile_model: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        self.dist = dist_info or Dist()
        self.model = model.to(device).train()
        self.stream, self.recipe, self.device = stream, recipe, device
        self.out_dir, self.workers, self.save_every, self.keep = out_dir, workers, save_every, keep
        self.log_every, self.progress = log_every, progress
        self.weights = LossWeights(recipe.l1_weight, recipe.fft_weight, recipe.aux_weight)
        self.amp_dtype = AMP_DTYPES[recipe.amp]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
        )
        self.scaler = torch.amp.GradScaler(device.type) if recipe.amp == "fp16" else None
        adapters = model.adapters()
        # expert_params[a][e]: the parameters of expert e of adapter a (forward order).
        self.expert_params = [[list(ex.parameters()) for ex in a.experts] for a in adapters]
        self.num_experts = len(adapters[0].experts)
        self.net: nn.Module = model
        if self.dist.world > 1 and cuda_graph:
            # The graphed step averages the gradients itself (DDP's hooks cannot be replayed):
            # only DDP's start, every rank from rank 0's weights, is done here.
            _broadcast_from_rank0(model)
        elif self.dist.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.cuda_graph = cuda_graph
        self._graphed: GraphedTrainStep | None = None
        self._micro_parts: list[torch.Tensor] = []  # the graphed step's loss parts, per micro-batch
        self._loss_scaler: DeviceLossScaler | None = None  # the graphed step's, with --amp fp16
        if cuda_graph:
            _check_cuda_graph_training(model, compile_model)
        if compile_model:
            # With a fast backend the forward is one graph: the adapters take the sync-free expert
            # path while compiling, whose shapes do not depend on the routing, so a new routing
            # never recompiles. The module attributes a forward sets (routing plans, the aux
            # loss) are side effects torch.compile replays after each call. The reference
            # backend's routing-dependent shapes compile static (model.compile_dynamic says why).
            self.net = torch.compile(self.net, dynamic=model.compile_dynamic())
        self.step_count = 0
        self._loader_iter = None
        self._writer = None
        self._use_tensorboard = tensorboard
        self.last_usage = np.zeros((len(adapters), self.num_experts), np.int64)

    # -- state --

    def resume(self, ckpt: Path) -> None:
        """Continue from checkpoint folder ``ckpt`` (model, optimiser, scaler, step)."""
        state, tensors, meta = read_training_checkpoint(ckpt)
        names = [n for n, _ in self.model.named_parameters()]
        if meta.get("param_names") != names:
            raise CLIError(f"{ckpt} was saved from another model architecture")
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CLIError(f"{ckpt}: model weights do not fit: {e}") from e
        self.optimizer.load_state_dict(optimizer_from_tensors(tensors, meta["optimizer"]))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step_count = int(meta["step"])
        self._loader_iter = None
        if self.dist.main and self.out_dir is not None:
            truncate_log(self.out_dir / "log.csv", self.step_count)

    def save(self) -> Path | None:
        if not self.dist.main or self.out_dir is None:
            return None
        extra = {
            "world_size": self.dist.world,
            "batch_size": self.stream.batch_size,
            "accumulation": self.stream.accumulation,
        }
        return save_training_checkpoint(
            self.out_dir,
            self.step_count,
            self.model,
            self.optimizer,
            # The graphed step's scaler holds the current scale (same state_dict keys).
            self._loss_scaler if self._loss_scaler is not None else self.scaler,
            self.recipe,
            extra,
            self.keep,
        )

    # -- data --

    def _batches(self):
        total = self.recipe.total_steps * self.stream.accumulation
        start = self.step_count * self.stream.accumulation
        dataset = MicroBatchDataset(self.stream, total)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=range(start, total),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.workers > 0 else None,
            persistent_workers=False,
        )
        return iter(loader)

    # -- one step --

    def _touch_experts(self) -> torch.Tensor:
        # 0 * one element of every expert parameter: every gradient hook fires (DDP), value 0.
        return sum(p.reshape(-1)[0] for ex in self.expert_params for ps in ex for p in ps) * 0.0

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch (degraded, clean) on the device."""
        batch = next(self._loader_iter)
        return (
            batch["degraded"].to(self.device, non_blocking=True),
            batch["clean"].to(self.device, non_blocking=True),
        )

    def _routing_counts(self) -> torch.Tensor:
        """[adapters, experts] float32: how many images chose each expert in the last forward."""
        return torch.stack(
            [torch.bincount(c.reshape(-1), minlength=self.num_experts) for c in self.model.routing_choices()]
        ).float()

    def step(self) -> dict[str, float]:
        """One optimiser step; returns the mean loss parts and the learning rate."""
        if self._loader_iter is None:
            self._loader_iter = self._batches()
        if self.cuda_graph:
            return self._graphed_step()
        acc = self.stream.accumulation
        num_adapters = len(self.expert_params)
        usage = torch.zeros(num_adapters, self.num_experts, device=self.device)
        parts_sum = torch.zeros(4, device=self.device)
        for a in range(acc):
            lq, gt = self._next_batch()
            torch.manual_seed(
                noise_seed(self.recipe.seed, self.step_count, a * self.dist.world + self.dist.rank)
            )
            sync = contextlib.nullcontext()
            if self.dist.world > 1 and a < acc - 1:
                sync = self.net.no_sync()
            with sync:
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    out = self.net(lq)
                loss, parts = restoration_loss(out, gt, self.model.total_loss, self.weights)
                if self.dist.world > 1:
                    loss = loss + self._touch_experts()
                loss = loss / acc
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            usage += self._routing_counts()
            parts_sum += torch.stack([loss.detach() * acc, parts["l1"], parts["fft"], parts["aux"]]) / acc
        if self.dist.world > 1:
            packed = torch.cat([usage.reshape(-1), parts_sum])
            dist.all_reduce(packed)
            usage = packed[: usage.numel()].reshape(usage.shape)
            parts_sum = packed[usage.numel() :] / self.dist.world
        host = torch.cat([usage.reshape(-1), parts_sum]).cpu().numpy()  # the one host sync per step
        counts = host[: usage.numel()].reshape(usage.shape).astype(np.int64)
        for a_idx, e_idx in zip(*np.nonzero(counts == 0), strict=True):
            for p in self.expert_params[a_idx][e_idx]:
                p.grad = None
        lr = lr_at(self.step_count, self.recipe)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.scaler is not None:
            if self.recipe.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.recipe.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.recipe.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.recipe.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.last_usage = counts
        loss, l1, fft, aux = (float(v) for v in host[usage.numel() :])
        return {"loss": loss, "l1": l1, "fft": fft, "aux": aux, "lr": lr}

    def _graph_loss(self, net: nn.Module, out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch inside the graph; after the step's last micro-batch
        ``_graph_parts`` holds the mean loss parts over the step (a tensor of the graph's, which
        each replay refills)."""
        loss, parts = restoration_loss(out, gt, net.total_loss, self.weights)
        self._micro_parts.append(torch.stack([loss.detach(), parts["l1"], parts["fft"], parts["aux"]]))
        if len(self._micro_parts) == self.stream.accumulation:
            parts_list, self._micro_parts = self._micro_parts, []
            self._graph_parts = parts_list[0] if len(parts_list) == 1 else torch.stack(parts_list).mean(0)
        return loss

    def _build_graph(self, lq: torch.Tensor, gt: torch.Tensor) -> GraphedTrainStep:
        """The step captured on the first batch (after a resume: of the resumed optimizer). AdamW
        is made capturable here, its lr a device tensor the graph reads at each replay."""
        capture = self.device.type == "cuda"
        self._micro_parts = []
        if capture:
            for g in self.optimizer.param_groups:
                g["capturable"] = True
                g["lr"] = torch.tensor(float(g["lr"]), device=self.device)
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].to(self.device, torch.float32)
        if self.scaler is not None:
            # GradScaler reads the inf flag on the host: the graph scales on the device, from
            # the scaler's state (a resumed run's included).
            self._loss_scaler = DeviceLossScaler(self.device)
            self._loss_scaler.load_state_dict(self.scaler.state_dict())
        return GraphedTrainStep(
            self.model,
            self.optimizer,
            self._graph_loss,
            lq,
            gt,
            autocast_dtype=self.amp_dtype,
            clip_grad=self.recipe.clip_grad,
            capture=capture,
            accumulation=self.stream.accumulation,
            loss_scaler=self._loss_scaler,
            process_group=dist.group.WORLD if self.dist.world > 1 else None,
        )

    def _graphed_step(self) -> dict[str, float]:
        """``step()`` with forward, backward and AdamW in one CUDA graph (see ``cuda_graph``).

        The step's micro-batches go to the graph as one batch, which it splits again. Unlike the
        eager step, the routing noise of the micro-batches is drawn from one seed per step (a
        graph cannot re-seed between them): with ``accumulation`` > 1 the two modes draw
        different noise (with 1 the same)."""
        batches = [self._next_batch() for _ in range(self.stream.accumulation)]
        lq = torch.cat([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
        gt = torch.cat([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
        if self._graphed is None:
            self._graphed = self._build_graph(lq, gt)
        lr = lr_at(self.step_count, self.recipe)
        self._graphed.set_lr(lr)
        # After the build's warm-up; each rank its own draw, as the eager step's first micro-batch.
        torch.manual_seed(noise_seed(self.recipe.seed, self.step_count, self.dist.rank))
        self._graphed(lq, gt)
        usage = self._graphed.routing_counts.float()  # summed over the ranks by the step
        parts = self._graph_parts
        if self.dist.world > 1:  # the logged losses: the mean over the ranks, as the eager step's
            parts = parts.clone()
            dist.all_reduce(parts)
            parts /= self.dist.world
        host = torch.cat([usage.reshape(-1), parts]).cpu().numpy()  # the one sync
        counts = host[: usage.numel()].reshape(usage.shape).astype(np.int64)
        self.step_count += 1
        self.last_usage = counts
        loss, l1, fft, aux = (float(v) for v in host[usage.numel() :])
        return {"loss": loss, "l1": l1, "fft": fft, "aux": aux, "lr": lr}

    # -- the loop --

    def _log(self, metrics: dict[str, float], images_per_s: float) -> None:
        if not self.dist.main or self.out_dir is None:
            return
        path = self.out_dir / "log.csv"
        new = not path.exists()
        levels = self.model.config.num_dec_blocks
        usage, start, level_usage = self.last_usage, 0, []
        for n in levels:
            u = usage[start : start + n].sum(0)
            level_usage.append("/".join(str(int(v)) for v in u))
            start += n
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                head = "step epoch lr loss l1 fft aux images_per_s".split()
                w.writerow(head + [f"dec{i}_expert_counts" for i in range(len(levels))])
            epoch = self.step_count * self.stream.global_batch / len(self.stream.items)
            values = [metrics[k] for k in ("lr", "loss", "l1", "fft", "aux")]
            w.writerow(
                [
                    self.step_count,
                    f"{epoch:.4f}",
                    *(f"{v:.6g}" for v in values),
                    f"{images_per_s:.2f}",
                    *level_usage,
                ]
            )
        if self._writer is None and self._use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except ImportError:
                self._use_tensorboard = False
            else:
                self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        if self._writer is not None:
            for k in ("loss", "l1", "fft", "aux"):
                self._writer.add_scalar(f"loss/{k}", metrics[k], self.step_count)
            self._writer.add_scalar("lr", metrics["lr"], self.step_count)
            self._writer.add_scalar("images_per_s", images_per_s, self.step_count)
            total = max(1, int(usage[0].sum()))
            start = 0
            for lvl, n in enumerate(levels):
                u = usage[start : start + n].sum(0) / (total * n)
                for e, frac in enumerate(u):
                    self._writer.add_scalar(f"routing/dec{lvl}_expert{e}", float(frac), self.step_count)
                start += n

    def fit(self, stop_after: int | None = None) -> int:
        """Train to ``total_steps`` (or ``stop_after`` more steps); returns 0, or 130 when
        stopped by a signal (after saving)."""
        total = self.recipe.total_steps
        first = self.step_count
        bar = tqdm(
            total=total,
            initial=first,
            desc="train",
            unit="step",
            disable=not (self.progress and self.dist.main),
            file=sys.stderr,
            dynamic_ncols=True,
        )
        status = 0
        ema = None
        with StopRequest() as stop:
            t0, n0 = time.perf_counter(), 0
            while self.step_count < total:
                metrics = self.step()
                n0 += 1
                ips = n0 * self.stream.global_batch / max(time.perf_counter() - t0, 1e-9)
                ema = metrics["loss"] if ema is None else 0.9 * ema + 0.1 * metrics["loss"]
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{ips:.1f}")
                stop_now = self._agree(stop.requested)
                done = self.step_count == total
                if stop_after is not None and self.step_count - first >= stop_after:
                    stop_now = True
                if self.step_count % self.log_every == 0 or done or stop_now:
                    self._log(metrics, ips)
                if done or stop_now or self.step_count % self.save_every == 0:
                    self.save()
                if stop_now and not done:
                    status = 130 if stop.requested else 0
                    break
        bar.close()
        if self._writer is not None:
            self._writer.close()
        return status

    def _agree(self, flag: bool) -> bool:
        """Whether any rank wants to stop (so that all ranks stop at the same step)."""
        if self.dist.world <= 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)


# --- the command -----------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` model overrides: ints, floats, booleans, comma lists (tuples)."""

    def value(text: str):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        if text.lower() == "none":
            return None
        if "," in text:
            return tuple(value(t) for t in text.split(",") if t)
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text

    out = {}
    for item in items:
        if "=" not in item:
            raise CLIError(f"--model-override takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if k not in CONFIG_FIELDS:
            raise CLIError(
                f"--model-override: unknown field {k!r}; fields: {', '.join(sorted(CONFIG_FIELDS))}"
            )
        out[k] = value(v)
    return out


def _parse_repeats(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        try:
            k, v = item.split("=", 1)
            out[canonical_task(k)] = int(v)
        except ValueError as e:
            raise CLIError(f"--repeat takes TASK=N, got {item!r}: {e}") from e
    return out


#: command-line argument -> Recipe field, for the arguments that define the computation.
RECIPE_ARGS = {"model_override": "model_overrides"} | {
    k: k for k in "config tasks crop lr min_lr weight_decay fft_weight aux_weight clip_grad amp seed".split()
}


def run(args: argparse.Namespace) -> int:
    dist_info, device = init_distributed(args.device)
    try:
        return _run(args, dist_info, device)
    finally:
        if dist.is_initialized():
            # Free the Trainer first: its graphed step (a reference cycle through its loss
            # function) holds the process group, and a group still referenced when it is
            # destroyed aborted a process at exit now and then (torch 2.11, gloo).
            gc.collect()
            dist.destroy_process_group()


def _run(args: argparse.Namespace, dist_info: Dist, device: torch.device) -> int:
    out_dir = Path(args.out)
    ckpt = None
    saved_recipe = None
    if args.resume:
        ckpt = find_checkpoint(out_dir if args.resume == "latest" else Path(args.resume))
        _, _, meta = read_training_checkpoint(ckpt)
        saved_recipe = Recipe.from_json(meta["recipe"])
    elif (out_dir / "checkpoints" / "latest").exists():
        raise CLIError(
            f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out"
        )
    if args.batch_size < 1 or args.accumulation < 1:
        raise CLIError("--batch-size and --accumulation must be >= 1")
    if args.cuda_graph:
        _check_cuda_graph_device(device)
    if args.crop < 8:
        raise CLIError("--crop must be >= 8")
    tasks = [canonical_task(t) for t in args.tasks]
    overrides = parse_overrides(args.model_override)
    try:
        items, mode = training_items(args.data, tasks, _parse_repeats(args.repeat))
    except DatasetLayoutError as e:
        raise CLIError(str(e)) from e
    global_batch = args.batch_size * args.accumulation * dist_info.world
    steps_per_epoch = max(1, len(items) // global_batch)
    total = args.steps if args.steps is not None else math.ceil(args.epochs * steps_per_epoch)
    warmup = (
        args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
    )
    recipe = Recipe(
        config=args.config,
        model_overrides=overrides,
        tasks=tasks,
        crop=args.crop,
        global_batch=global_batch,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_steps=min(warmup, total),
        total_steps=max(1, total),
        fft_weight=args.fft_weight,
        aux_weight=args.aux_weight,
        clip_grad=args.clip_grad,
        amp=args.amp,
        seed=args.seed,
        data_fingerprint=fingerprint(items, Path(args.data)),
    )
    if saved_recipe is not None:
        recipe = _merge_resumed(recipe, saved_recipe, args)
    torch.manual_seed(recipe.seed)
    try:
        model = moceir.build_model(recipe.config, backend=args.backend, **recipe.model_overrides)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    stream = TrainingStream(
        items, recipe.crop, args.batch_size, args.accumulation, dist_info.world, dist_info.rank, recipe.seed
    )
    trainer = Trainer(
        model,
        stream,
        recipe,
        device,
        out_dir,
        dist_info,
        workers=args.workers,
        save_every=args.save_every,
        keep=args.keep,
        log_every=args.log_every,
        tensorboard=not args.no_tensorboard,
        progress=not args.quiet,
        compile_model=args.compile,
        cuda_graph=args.cuda_graph,
    )
    if ckpt is not None:
        trainer.resume(ckpt)
    if dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"training {recipe.config} ({n_params:,} parameters) on {device} x{dist_info.world}: "
            f"{len(items)} examples ({mode}: {', '.join(tasks)}), global batch {global_batch} "
            f"({args.batch_size} x {args.accumulation} accumulation x {dist_info.world} processes), "
            f"steps {trainer.step_count}->{recipe.total_steps} (warm-up {recipe.warmup_steps}), "
            f"{recipe.crop}px crops, amp {recipe.amp}",
            file=sys.stderr,
        )
        run_info = {
            "recipe": recipe.to_json(),
            "data": str(args.data),
            "mode": mode,
            "examples": len(items),
            "world_size": dist_info.world,
            "torch": torch.__version__,
            "moceir": moceir.__version__,
        }
        (out_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    status = trainer.fit(stop_after=args.stop_after)
    if dist_info.main:
        if trainer.step_count >= recipe.total_steps:
            save_checkpoint(model, out_dir / "model.safetensors", overwrite=True)
            print(f"done: {out_dir / 'model.safetensors'} (step {trainer.step_count})", file=sys.stderr)
        else:
            print(
                f"stopped at step {trainer.step_count}/{recipe.total_steps}; continue with "
                f"`moceir train --out {out_dir} --data {args.data} --resume`",
                file=sys.stderr,
            )
    return status


def _merge_resumed(recipe: Recipe, saved: Recipe, args: argparse.Namespace) -> Recipe:
    """The saved recipe, refusing command-line values that would change the computation."""
    problems = []
    for arg, name in RECIPE_ARGS.items():
        given = getattr(args, arg)
        if arg == "model_override":
            given = parse_overrides(given)
        if arg == "tasks":
            given = [canonical_task(t) for t in given]
        if given != _DEFAULTS.get(arg) and given != getattr(saved, name):
            problems.append(f"--{arg.replace('_', '-')} {given} (checkpoint: {getattr(saved, name)})")
    if recipe.global_batch != saved.global_batch:
        problems.append(f"global batch {recipe.global_batch} (checkpoint: {saved.global_batch})")
    if recipe.data_fingerprint != saved.data_fingerprint and not args.allow_data_change:
        problems.append("the training data changed (pass --allow-data-change to continue anyway)")
    if problems:
        raise CLIError("cannot resume with a different recipe: " + "; ".join(problems))
    merged = dataclasses.replace(saved)
    if args.steps is not None and args.steps != saved.total_steps:
        raise CLIError(
            f"--steps {args.steps} differs from the checkpoint's schedule ({saved.total_steps} steps)"
        )
    if args.allow_data_change:
        merged.data_fingerprint = recipe.data_fingerprint
    return merged


_DEFAULTS: dict = {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="official layout root (below) or any folder of clean images")
    g.add_argument(
        "--tasks",
        nargs="+",
        default=["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"],
        choices=[*TASKS, *TASK_ALIASES],
        metavar="TASK",
        help=f"tasks to train (default: the paper's 3-task setting); any of {', '.join(TASKS)}",
    )
    g.add_argument(
        "--repeat", nargs="*", default=[], metavar="TASK=N", help="override a task's repetition (balancing)"
    )
    g.add_argument("--crop", type=int, default=128, help="random crop size (default 128)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading processes")
    g = parser.add_argument_group("model")
    g.add_argument("--config", default="moce_ir_s", choices=sorted(CONFIGS))
    g.add_argument(
        "--model-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="MoCEIRConfig fields, e.g. top_k=2",
    )
    g.add_argument("--backend", default="auto", choices=moce_kernels.BACKENDS)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: one GPU per process)")
    g = parser.add_argument_group("optimisation (the paper's recipe by default)")
    g.add_argument("--batch-size", type=int, default=8, help="images per micro-batch per process (default 8)")
    g.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    g.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW weight decay (torch default, as the paper)"
    )
    g.add_argument(
        "--epochs", type=float, default=150, help="schedule length in passes over the data (default 150)"
    )
    g.add_argument("--warmup-epochs", type=float, default=15, help="linear warm-up length (default 15)")
    g.add_argument(
        "--steps", type=int, default=None, help="schedule length in optimiser steps (overrides --epochs)"
    )
    g.add_argument(
        "--warmup-steps", type=int, default=None, help="warm-up in steps (overrides --warmup-epochs)"
    )
    g.add_argument("--fft-weight", type=float, default=0.1)
    g.add_argument("--aux-weight", type=float, default=0.01, help="weight of the routing auxiliary loss")
    g.add_argument(
        "--clip-grad", type=float, default=0.0, help="clip the gradient norm (0: off, as the paper)"
    )
    g.add_argument(
        "--amp", default="none", choices=sorted(AMP_DTYPES), help="autocast dtype (fp16 adds a GradScaler)"
    )
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="run folder: checkpoints/, model.safetensors, log.csv")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in --out (or from the checkpoint folder given) exactly where it stopped",
    )
    g.add_argument("--allow-data-change", action="store_true", help="resume although the data set changed")
    g.add_argument(
        "--save-every",
        type=int,
        default=1000,
        help="checkpoint every N steps (and at the end, and on Ctrl-C)",
    )
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (oldest deleted)")
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (with a checkpoint) after N steps of this invocation",
    )
    g.add_argument("--log-every", type=int, default=10, help="log.csv / TensorBoard every N steps")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard scalars even if installed")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (one graph with a fast backend; the first steps compile)",
    )
    g.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the whole step (forward, backward, AdamW; every micro-batch of --accumulation) in a "
        "CUDA graph and replay it: one host call per step (CUDA, a fast backend; under torchrun the "
        "gradients are averaged inside the graph)",
    )
    parser.set_defaults(func=run)
    _DEFAULTS.update({a: parser.get_default(a) for a in RECIPE_ARGS})
    _DEFAULTS["tasks"] = [canonical_task(t) for t in _DEFAULTS["tasks"]]
    _DEFAULTS["model_override"] = {}


DESCRIPTION = __doc__.split("\n\n")[0].replace("``moceir train``: ", "") + (
    "\n\nThe paper's recipe by default: AdamW lr 2e-4, linear warm-up (15 epochs) then cosine (150 epochs),\n"
    "128x128 crops with flips/rotations, L1 + 0.1 FFT-L1 + 0.01 routing loss, tasks balanced by\n"
    "repetition. Checkpoints (safetensors, atomic) go to OUT/checkpoints/; --resume continues exactly\n"
    "(model, optimiser, schedule, data order, routing noise). Ctrl-C: finishes the step, saves, exits\n"
    "(twice: aborts)."
)

EPILOG = (
    "--data: the official layout (paired by file name; tasks read their own folders):\n"
    + describe_layouts(TRAIN_LAYOUTS)
    + "\n  or any folder of clean images: each task's degradation is then synthesised on the fly\n"
    "  (noise sigma 15/25/50, rain streaks, haze, motion blur, low light).\n\n"
    "examples:\n"
    "  moceir train --data data --out runs/aio3\n"
    "  moceir train --data data --out runs/aio5 --amp bf16 \\\n"
    "      --tasks denoise_25 derain dehaze deblur lowlight\n"
    "  torchrun --nproc_per_node 4 -m moceir train --data data --out runs/aio3  # 4 GPUs x batch 8\n"
    "  moceir train --data my_clean_photos/ --out runs/mine --steps 20000\n"
    "  moceir train --out runs/aio3 --data data --resume"
)
