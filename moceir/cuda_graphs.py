"""CUDA graphs of a whole MoCE-IR inference forward or training step.

An eager training step of MoCE-IR-S launches ~16,000 kernels (batch 8, 128 x 128, bf16
autocast; measured on an H100, where those kernels kept the GPU busy ~100 ms of a ~520 ms
step): the step is bound by the host. A captured graph replays every kernel of the step from
one host call. What it needs, and what these classes arrange:

- no host synchronisation inside the step: the adapters take the sync-free expert path (set for
  the warm-up and the capture, then restored), with a fast backend ("auto", "cuda", "triton";
  the reference reads routing counts on the host), and the model's input NaN check steps aside;
- fixed shapes and addresses: inputs are copied into static buffers, outputs live in the
  graph's memory pool and are overwritten by the next replay (``__call__`` returns a copy
  unless asked not to);
- for training, an optimizer that can be captured (``torch.optim.Adam``/``AdamW`` with
  ``capturable=True``; a tensor learning rate can then change between replays, see
  :meth:`GraphedTrainStep.set_lr`), gradients the graph owns (set to None before the capture,
  so the backward allocates them in the pool and each replay overwrites them), and autocast
  without its weight cache (``cache_enabled=False``, as torch asks for graphs).

Warm-up steps run before the capture (on a side stream, as torch asks); for training they
update the weights, so the weights and the optimizer state are saved before and put back after
(nothing the caller had is changed by building the step). Random draws (the routing noise)
come from the default CUDA generator, which graphs advance at each replay.

Same step as our trainer's: an expert that no image chose gets a zero gradient in the graph,
and AdamW would still decay it and move it by its momentum, where ``moceir.train`` sets such
experts' gradients to None so that AdamW leaves them untouched (as the official training does).
``GraphedTrainStep`` puts their weights and optimizer state back after the step, from the
routing counts on the device (``skip_unused_experts=True``, the default). The per-step loss is
a device tensor (reading it synchronises).

Several processes (``process_group``): the step averages the gradients and sums the routing
counts over the group's ranks itself, with collectives inside the step (NCCL's are captured in
the graph), as DistributedDataParallel would; DDP's own hooks are not used.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from .layers.adapter import MoCELayer

if TYPE_CHECKING:
    from .model import MoCEIR

#: Optimizers whose step torch can capture (with ``capturable=True``).
CAPTURABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def _check_model(model: MoCEIR, what: str) -> None:
    params = list(model.parameters())
    if not params or not params[0].is_cuda:
        raise ValueError(
            f"{what} needs the model on a CUDA device, got {params[0].device if params else 'no parameters'}"
        )
    backend = getattr(model, "backend", None)
    if backend == "reference":
        raise ValueError(
            f"{what} needs a fast backend: the reference reads the routing counts on the host, which a "
            "CUDA graph cannot capture; call model.set_backend('auto') (or 'cuda' / 'triton') first"
        )


def _check_example(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on the model's device {device}, got {t.device}")


@contextmanager
def _capture_settings(model: MoCEIR, adapters: list[MoCELayer]):
    """The sync-free expert path and no input NaN check (a host read) while warming up and
    capturing; the model's own settings afterwards."""
    paths, check = [a.expert_path for a in adapters], model.check_inputs
    model.set_expert_path("sync_free")
    model.check_inputs = False
    try:
        yield
    finally:
        for a, p in zip(adapters, paths, strict=True):
            a.expert_path = p
        model.check_inputs = check


def _copy_into(static: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.shape != static.shape or value.dtype != static.dtype:
        raise ValueError(
            f"{name} must have the captured shape {tuple(static.shape)} and dtype {static.dtype}, "
            f"got {tuple(value.shape)} {value.dtype} (capture another graph for another shape)"
        )
    static.copy_(value)


def _weights_and_state(
    params: list[nn.Parameter], optimizer: torch.optim.Optimizer
) -> dict[tuple, torch.Tensor]:
    """The weights and their optimizer state tensors, keyed (parameter index, state name)."""
    found = {}
    for i, p in enumerate(params):
        found[(i, "")] = p.detach()
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                found[(i, k)] = v
    return found


def _copies(tensors: dict[tuple, torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """Copies of the tensors (foreach: a few launches; inside a graph replayed, not launched)."""
    return dict(zip(tensors, torch._foreach_mul(list(tensors.values()), 1.0), strict=True))


def _blend(after: dict[tuple, torch.Tensor], before: dict[tuple, torch.Tensor], keep: torch.Tensor) -> None:
    """In place: t = t * keep + before * (1 - keep), exact for keep in {0, 1} (finite tensors).
    A tensor with no copy in ``before`` (state the step created) becomes t * keep: zeros, a fresh
    state, when the step is undone."""
    with torch.no_grad():
        torch._foreach_mul_(list(after.values()), keep)
        keys = [k for k in after if k in before]
        if keys:
            torch._foreach_add_(
                [after[k] for k in keys], torch._foreach_mul([before[k] for k in keys], 1.0 - keep)
            )


class UnusedExperts:
    """Undoes an optimizer step for the experts that no image chose, without a host read.

    Those experts' gradients are zeros (or absent, per path); our trainer sets them to None
    after reading the routing counts on the host, so that the optimizer skips them. ``kept =
    guard.keep()`` before ``optimizer.step()`` and ``guard.undo(kept)`` after it put their
    weights and optimizer state back, as chosen by each adapter's last routing counts on the
    device: the same step without the host read.
    """

    def __init__(self, adapters: list[MoCELayer], optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.adapters = adapters
        # (adapter index, expert index, the expert's parameters).
        self.experts = [
            (i, e, list(ex.parameters())) for i, a in enumerate(adapters) for e, ex in enumerate(a.experts)
        ]

    def keep(self) -> list[dict[tuple, torch.Tensor]]:
        """Copies, before the optimizer step, of what it will change for each expert."""
        return [_copies(_weights_and_state(params, self.optimizer)) for _, _, params in self.experts]

    def undo(self, kept: list[dict[tuple, torch.Tensor]], counts: torch.Tensor | None = None) -> None:
        """t = t * used + kept * (1 - used) per expert, with ``used`` from the routing counts on
        the device: exact for used in {0, 1}. State the step created (Adam's first step) has no
        copy: it is zeroed for an unused expert, which is where a fresh state starts.

        ``counts``: [adapters, experts] routing counts of the whole step (summed over its
        micro-batches); None takes each adapter's last forward's."""
        if counts is None:
            counts = torch.stack([a.last_plan.counts for a in self.adapters])
        for (i, e, params), before in zip(self.experts, kept, strict=True):
            used = (counts[i, e] > 0).to(torch.float32)
            _blend(_weights_and_state(params, self.optimizer), before, used)


class DeviceLossScaler:
    """``torch.amp.GradScaler``'s dynamic loss scaling with no host read, for float16 inside a
    CUDA graph: the scale, growth tracker and inf flag live on the device, and a step whose
    gradients hold Inf/NaN is undone on the device (:class:`GraphedTrainStep`) where GradScaler
    skips it after reading the flag on the host.

    The same arithmetic as GradScaler (torch's ``_amp_foreach_non_finite_check_and_unscale_`` and
    ``_amp_update_scale_``). ``state_dict()`` / ``load_state_dict()`` use GradScaler's keys, so a
    trainer hands its scaler's state over and back (``state_dict()`` reads the device).
    """

    def __init__(
        self,
        device: torch.device | str,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ValueError(
                "DeviceLossScaler needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                f"growth_interval >= 1, got {init_scale}, {growth_factor}, {backoff_factor}, "
                f"{growth_interval}"
            )
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.scale = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        #: 1.0 when the last step's gradients held Inf/NaN (that step was undone), else 0.0.
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def tensors(self) -> list[torch.Tensor]:
        """The state on the device (scale, growth tracker, inf flag)."""
        return [self.scale, self.growth_tracker, self.found_inf]

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        """Divide ``grads`` by the scale in place and set ``found_inf``, as GradScaler.unscale_."""
        self.found_inf.zero_()
        inv_scale = self.scale.double().reciprocal().float()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, self.found_inf, inv_scale)

    def update(self) -> None:
        """Back off after a non-finite step, grow after ``growth_interval`` finite ones."""
        torch._amp_update_scale_(
            self.scale, self.growth_tracker, self.found_inf,
            self.growth_factor, self.backoff_factor, self.growth_interval,
        )  # fmt: skip

    def state_dict(self) -> dict:
        return {
            "scale": float(self.scale),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": int(self.growth_tracker),
        }

    def load_state_dict(self, state: dict) -> None:
        """GradScaler's state (``GradScaler.state_dict()``) or this class's."""
        with torch.no_grad():
            self.scale.fill_(float(state["scale"]))
            self.growth_tracker.fill_(int(state["_growth_tracker"]))
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])


class GraphedInference:
    """``model(x)`` (no autograd) captured in a CUDA graph for inputs of ``example``'s shape.

    ``graphed(x)`` copies ``x`` into the graph's input, replays, and returns the output (a copy
    unless ``copy_output=False``: then the graph's own output tensor, overwritten by the next
    call). ``routing_choices`` holds the experts the last call chose, per adapter (as
    ``model.routing_choices()`` after an eager forward; the model's own attributes belong to the
    last capture, which may be another graph's). The model must stay as captured: other weights
    (the same tensors updated in place are fine), a new backend or mode need a new capture.
    ``capture=False`` runs the same forward eagerly at each call, on any device.

    Raises ValueError for a model on the CPU or on the reference backend (when capturing), and
    for inputs of another shape or dtype.
    """

    def __init__(self, model: MoCEIR, example: torch.Tensor, warmup: int = 2, capture: bool = True) -> None:
        if capture:
            _check_model(model, "GraphedInference")
        adapters = model.adapters()
        device = next(model.parameters()).device
        _check_example("example", example, device)
        self.model, self._adapters = model, adapters
        self.static_input = example.detach().clone()
        self.graph = None
        self.routing_choices: list[torch.Tensor] = []
        if not capture:
            return
        self.graph = torch.cuda.CUDAGraph()
        with _capture_settings(model, adapters), torch.inference_mode():
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # kernels load, per-configuration metadata reaches the GPU
                    model(self.static_input)
            torch.cuda.current_stream(device).wait_stream(stream)
            with torch.cuda.graph(self.graph):
                self.static_output = model(self.static_input)
            self.routing_choices = model.routing_choices()

    def replay(self) -> torch.Tensor:
        """Run the graph on what the input buffer holds; returns the graph's output tensor."""
        if self.graph is None:
            with _capture_settings(self.model, self._adapters), torch.inference_mode():
                out = self.model(self.static_input)
                self.routing_choices = self.model.routing_choices()
            return out
        self.graph.replay()
        return self.static_output

    def __call__(self, x: torch.Tensor, copy_output: bool = True) -> torch.Tensor:
        _copy_into(self.static_input, x, "x")
        out = self.replay()
        return out.clone() if copy_output and self.graph is not None else out


def _average_gradients(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Each gradient := its mean over the group's ranks, one all-reduce per dtype (a flat copy).
    Every rank holds the same list: on the sync-free path every parameter gets a gradient,
    whatever the routing."""
    world = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for g, part in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(part.view_as(g))


class GraphedTrainStep:
    """One training step (forward, loss, backward, optimizer step) captured in a CUDA graph.

    ``step(x, target)`` copies the batch into the graph's buffers, replays, and returns the
    loss as a device tensor (the graph's own, overwritten by the next step). ``loss_fn(model,
    output, target)`` builds the loss inside the graph (add ``model.total_loss`` there for the
    routing loss). ``autocast_dtype`` (e.g. torch.bfloat16) runs the forward under autocast.
    ``clip_grad`` > 0 clips the gradients' global norm inside the graph (no host read).
    ``accumulation`` > 1 splits each batch into that many micro-batches (the batch size must
    divide): forward and backward of each in turn, the losses divided by ``accumulation`` and
    the gradients summed, then one optimizer step, all in the one graph (activation memory of
    one micro-batch). The step's loss is then the mean over the micro-batches, and
    ``routing_counts`` ([adapters, experts] device tensor, refreshed at each step) sums them.
    ``loss_scaler`` (a :class:`DeviceLossScaler`, for float16 autocast): the losses are scaled,
    the gradients unscaled before clipping, and a step whose gradients hold Inf/NaN is undone
    (weights and optimizer state as before it; GradScaler would skip it), the scale updated.
    ``skip_unused_experts``: leave the weights and optimizer state of experts that no image
    chose as they were (eager semantics, see the module's docstring); False lets the optimizer
    update them from zero gradients (a little less work).

    ``process_group``: a ``torch.distributed`` process group whose ranks each run this step on
    their own batch (data parallel; the same model and optimizer state on every rank): after the
    backward the gradients are averaged over the ranks and the routing counts summed (an expert
    is unused when no rank's image chose it), one all-reduce per gradient dtype, inside the
    step. None: one process.

    ``capture=False`` runs the very same step eagerly at each call, with no graph (and no CUDA,
    capturable optimizer or warm-up needed): to debug a captured step against it, and how
    ``moceir.train`` runs its ``cuda_graph`` mode on a CPU.

    Raises ValueError for a model on the CPU or on the reference backend, an optimizer that
    torch cannot capture (Adam/AdamW with ``capturable=True`` can be), or batches whose shape
    or dtype differ from the examples'.
    """

    def __init__(
        self,
        model: MoCEIR,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        example_input: torch.Tensor,
        example_target: torch.Tensor,
        autocast_dtype: torch.dtype | None = None,
        warmup: int = 3,
        skip_unused_experts: bool = True,
        clip_grad: float = 0.0,
        capture: bool = True,
        accumulation: int = 1,
        loss_scaler: DeviceLossScaler | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if capture:
            _check_model(model, "GraphedTrainStep")
        if process_group is not None and not dist.is_initialized():
            raise ValueError("process_group was given, but torch.distributed is not initialised")
        adapters = model.adapters()
        device = next(model.parameters()).device
        _check_example("example_input", example_input, device)
        _check_example("example_target", example_target, device)
        if capture and (
            not isinstance(optimizer, CAPTURABLE_OPTIMIZERS)
            or not all(g.get("capturable", False) for g in optimizer.param_groups)
        ):
            raise ValueError(
                "optimizer must be torch.optim.Adam or AdamW built with capturable=True (a CUDA graph "
                f"replays its step), got {type(optimizer).__name__} with capturable="
                f"{[g.get('capturable', False) for g in optimizer.param_groups]}"
            )
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer state is created then), got {warmup}")
        if not clip_grad >= 0:
            raise ValueError(f"clip_grad must be >= 0 (0: no clipping), got {clip_grad}")
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"accumulation must be an int >= 1, got {accumulation!r}")
        if example_input.shape[0] % accumulation or example_target.shape[0] != example_input.shape[0]:
            raise ValueError(
                f"example_input and example_target must hold the same number of images, a multiple of "
                f"accumulation = {accumulation} (the micro-batches), got {example_input.shape[0]} and "
                f"{example_target.shape[0]}"
            )
        if loss_scaler is not None and not isinstance(loss_scaler, DeviceLossScaler):
            raise ValueError(
                f"loss_scaler must be a moceir.cuda_graphs.DeviceLossScaler (torch's GradScaler reads the "
                f"host), got {type(loss_scaler).__name__}"
            )
        self.accumulation = accumulation
        self.loss_scaler = loss_scaler
        self.process_group = process_group
        self.routing_counts: torch.Tensor | None = None
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast_dtype, self.clip_grad, self.capture = autocast_dtype, float(clip_grad), capture
        self._device_type = device.type
        self._adapters = adapters
        self._unused = UnusedExperts(adapters, optimizer) if skip_unused_experts else None
        self.static_input = example_input.detach().clone()
        self.static_target = example_target.detach().clone()
        self.graph = None
        if not capture:
            return
        saved = self._save_state()
        model.train()
        self.graph = torch.cuda.CUDAGraph()
        try:  # the weights are put back even when a warm-up step or the capture fails
            with _capture_settings(model, adapters):
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(warmup):
                        optimizer.zero_grad(set_to_none=True)
                        self._body()
                torch.cuda.current_stream(device).wait_stream(stream)
                optimizer.zero_grad(set_to_none=True)  # the graph allocates (and owns) the gradients
                with torch.cuda.graph(self.graph):
                    self.static_loss = self._body()
        finally:
            self._restore_state(saved)

    def _body(self) -> torch.Tensor:
        micro = self.static_input.shape[0] // self.accumulation
        losses, counts = [], None
        for a in range(self.accumulation):
            part = slice(a * micro, (a + 1) * micro)
            with torch.autocast(
                self._device_type,
                dtype=self.autocast_dtype or torch.bfloat16,
                enabled=self.autocast_dtype is not None,
                cache_enabled=False,
            ):
                out = self.model(self.static_input[part])
                loss = self.loss_fn(self.model, out, self.static_target[part])
            scaled = loss / self.accumulation if self.accumulation > 1 else loss
            if self.loss_scaler is not None:
                scaled = scaled * self.loss_scaler.scale  # as GradScaler.scale
            scaled.backward()
            losses.append(loss.detach())
            step_counts = torch.stack([adapter.last_plan.counts for adapter in self._adapters])
            counts = step_counts if counts is None else counts + step_counts
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.process_group is not None:
            _average_gradients([p.grad for p in params], self.process_group)
            dist.all_reduce(counts, group=self.process_group)
        # Captured: a tensor of the graph's, which each replay refills.
        self.routing_counts = counts
        if self.loss_scaler is not None:
            self.loss_scaler.unscale_([p.grad for p in params])
            # A step with Inf/NaN gradients runs on zeros and is undone below: finite values
            # throughout, so that the undo's blend is exact.
            inf = self.loss_scaler.found_inf > 0
            for p in params:
                p.grad.masked_fill_(inf, 0.0)
        if self.clip_grad > 0:
            # foreach norms and scaling, no host read (error_if_nonfinite would be one); zero
            # gradients of unused experts add nothing to the norm, as None ones would not.
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        kept = self._unused.keep() if self._unused is not None else None
        before = _copies(self._all_tensors()) if self.loss_scaler is not None else None
        self.optimizer.step()
        if self._unused is not None:
            self._unused.undo(kept, counts)
        if self.loss_scaler is not None:
            self._undo_if_inf(before)
            self.loss_scaler.update()
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _all_tensors(self) -> dict[tuple, torch.Tensor]:
        """Every weight and optimizer state tensor."""
        return _weights_and_state(
            [p for g in self.optimizer.param_groups for p in g["params"]], self.optimizer
        )

    def _undo_if_inf(self, before: dict[tuple, torch.Tensor]) -> None:
        """After a step with Inf/NaN gradients (run on zeroed ones, so finite), everything as
        before it; state the step created (Adam's first) is zeroed, a fresh state."""
        _blend(self._all_tensors(), before, 1.0 - self.loss_scaler.found_inf)

    def _save_state(self) -> dict:
        """Copies of the weights, buffers and optimizer state the warm-up steps will change."""
        with torch.no_grad():
            return {
                "params": [p.detach().clone() for p in self.model.parameters()],
                "buffers": [b.detach().clone() for b in self.model.buffers()],
                "optim": {
                    p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                    for p, s in self.optimizer.state.items()
                },
                "scaler": [t.clone() for t in self.loss_scaler.tensors()] if self.loss_scaler else [],
            }

    def _restore_state(self, saved: dict) -> None:
        """Put back what the warm-up changed, in place (the graph holds these very tensors).
        Optimizer state the warm-up created is zeroed: what a fresh Adam starts from."""
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), saved["params"], strict=True):
                p.copy_(v)
            for b, v in zip(self.model.buffers(), saved["buffers"], strict=True):
                b.copy_(v)
            for t, v in zip(
                self.loss_scaler.tensors() if self.loss_scaler else [], saved["scaler"], strict=True
            ):
                t.copy_(v)
            for p, state in self.optimizer.state.items():
                before = saved["optim"].get(p, {})
                for k, v in state.items():
                    if not isinstance(v, torch.Tensor):
                        continue
                    if k in before and isinstance(before[k], torch.Tensor):
                        v.copy_(before[k])
                    else:
                        v.zero_()

    def set_lr(self, lr: float) -> None:
        """Change the learning rate of every group for the next steps. A captured graph reads
        it only from a tensor ``lr`` given to the optimizer (a float is baked into the graph)."""
        for g in self.optimizer.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            elif self.capture:
                raise ValueError(
                    "set_lr needs the optimizer built with a tensor lr (e.g. lr=torch.tensor(2e-4, "
                    "device='cuda')): a float lr is baked into the captured graph"
                )
            else:
                g["lr"] = lr

    def replay(self) -> torch.Tensor:
        """One step on what the batch buffers hold; returns the step's loss tensor (with a
        graph, the graph's own)."""
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            with _capture_settings(self.model, self._adapters):
                self.model.train()
                return self._body()
        self.graph.replay()
        return self.static_loss

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _copy_into(self.static_input, x, "x")
        _copy_into(self.static_target, target, "target")
        return self.replay()
