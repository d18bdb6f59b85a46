"""Model benchmarks: MoCE-IR-S inference, training step, one video frame and one
mixture-of-experts adapter alone, per backend.

Workloads (GPU sizes; ``--quick``, ``--tiny`` and the CPU scale them down and say so):
- ``inference``: batch 1 at 512 x 512 and batch 16 at 256 x 256, fp32 and bf16 (model cast);
- ``training``: one optimizer step (L1 + 0.01 * routing loss, AdamW) at batch 8, 128 x 128
  crops, fp32 and bf16 autocast;
- ``video``: one 1920 x 1080 frame, bf16 and fp32, in frames/s, with the bytes the network
  moves per frame (every kernel's inputs and outputs, counted by a dispatch mode: each aten or
  ``torch.ops`` call once, views excluded), its flops (``FlopCounterMode``: convolutions and
  matmuls), the frame rate the copy bandwidth of the same run allows, and where the time goes
  (``breakdown``: self time per module type and per kernel-op call, from timestamps taken
  around each call: CUDA events on a GPU);
- ``adapter``: one adapter layer (``MoCELayer``: routing, experts, gating) alone, forward and
  backward in train mode (the gradients of its weights and of both inputs; no optimizer step),
  at the inputs a batch of 8 crops of 128 x 128 gives the first adapter of decoder level 1
  (128 channels at 32 x 32) and of level 3 (32 channels at 128 x 128), bf16 autocast.

Providers: every model backend that runs here (``model.set_backend``: reference, auto, cuda /
cpu, triton) in eager mode, ``compiled-reference``: ``torch.compile`` of the reference, and
``compiled-auto``: ``torch.compile`` of the fastest backend (on GPU; on the CPU only with
``--compile``), ``auto-sync-free``: the fastest backend with the adapters on the sync-free expert
path (``model.set_expert_path("sync_free")``), and ``graphed-auto`` (GPU): the inference forward or
the whole training step (``moceir.cuda_graphs``) captured once in a CUDA graph and replayed.
Peak memory (GPU) is ``max_memory_allocated`` over one call; for ``graphed-auto``, whose replay
allocates nothing, the memory reserved while the graph is held (its private pool included).
On a GPU the ``compiled-*`` jobs run in a process of their own (``run_isolated``): a crash
inside torch.compile costs their row, not the rest of the run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import moceir
from benchmarks.common import Deadline, measure, roofline_ms, synchronize
from moceir.cuda_graphs import GraphedInference, GraphedTrainStep
from moceir.layers import tuning

VIDEO = (1080, 1920)
#: The network of ``--tiny`` runs: MoCE-IR-S's structure, narrower and one block per level.
TINY_OVERRIDES = {
    "dim": 8,
    "num_blocks": (1, 1, 1, 1),
    "num_dec_blocks": (1, 1, 1),
    "num_refinement_blocks": 1,
}


@dataclass(frozen=True)
class Workload:
    kind: str  # "inference", "training", "video" or "adapter"
    batch: int
    height: int
    width: int
    #: "float32", "bfloat16" (model and input cast) or "bf16-autocast" (training).
    precision: str
    compile: bool = False  # also time torch.compile of the reference
    scaled_from: tuple[int, int] | None = None
    #: "adapter": the decoder level (1 = deepest) whose first adapter is timed.
    level: int | None = None

    @property
    def case(self) -> str:
        if self.kind == "video":
            return f"{self.height}x{self.width}"
        if self.kind == "adapter":
            return f"b{self.batch}.{self.height}x{self.width}.level{self.level}"
        return f"b{self.batch}.{self.height}x{self.width}"

    @property
    def shape(self) -> list[int]:
        return [self.batch, 3, self.height, self.width]


def _video(precision: str, scale: int = 1, compile_: bool = False) -> Workload:
    h, w = -(-VIDEO[0] // scale), -(-VIDEO[1] // scale)
    return Workload("video", 1, h, w, precision, compile_, None if scale == 1 else VIDEO)


def _adapters(batch: int, size: int, precision: str, compile_: bool = False) -> list[Workload]:
    """The adapter alone at the inputs ``batch`` crops of ``size`` x ``size`` give it."""
    return [Workload("adapter", batch, size, size, precision, compile_, level=level) for level in (1, 3)]


def workloads(device: torch.device, size: str) -> list[Workload]:
    """The workloads of a run, most important first (a run cut by its deadline keeps those).

    ``size`` "issue": the inference workloads exactly as the issue states them (batch 1 at
    512 x 512, batch 16 at 256 x 256, float32) on any device: on the 2-core CPU the check of the
    issue's CPU target, at the sizes its GPU targets use (minutes per provider there)."""
    if size == "issue":
        return [Workload("inference", 1, 512, 512, "float32"), Workload("inference", 16, 256, 256, "float32")]
    if size == "tiny":
        return [
            Workload("inference", 1, 32, 32, "float32"),
            Workload("training", 1, 32, 32, "float32"),
            _video("float32", scale=32),
            Workload("adapter", 1, 32, 32, "float32", level=1),
        ]
    if device.type == "cuda":
        main = [
            _video("bfloat16", compile_=True),
            Workload("training", 8, 128, 128, "bf16-autocast", compile=True),
            Workload("inference", 1, 512, 512, "bfloat16", compile=True),
        ]
        if size == "quick":
            return main
        return [
            *main,
            Workload("inference", 16, 256, 256, "bfloat16"),
            Workload("training", 8, 128, 128, "float32", compile=True),
            _video("float32"),
            Workload("inference", 1, 512, 512, "float32"),
            Workload("inference", 16, 256, 256, "float32"),
            *_adapters(8, 128, "bf16-autocast", compile_=True),
        ]
    # A 2-core CPU: the same workloads scaled down (a CPU training step at batch 8, 128 x 128 takes
    # minutes), fp32 only.
    if size == "quick":  # compile=True: timed compiled too when --compile asks for it
        return [
            Workload("inference", 1, 128, 128, "float32", compile=True),
            Workload("training", 1, 64, 64, "float32", compile=True),
            _video("float32", scale=8),
        ]
    return [
        Workload("inference", 1, 256, 256, "float32"),
        Workload("inference", 4, 128, 128, "float32"),
        Workload("training", 2, 64, 64, "float32"),
        _video("float32", scale=4),
        *_adapters(2, 64, "float32"),
    ]


#: Seconds a torch.compile job is started with at least (the reference breaks the graph at every
#: adapter's host read: many graphs to compile).
COMPILE_NEEDS_S = 90.0
#: ``torch.compile`` providers: "compiled-<backend>" compiles the model set to that backend.
COMPILED_PROVIDERS = ("compiled-reference", "compiled-auto")
#: The fastest backend with the adapters on the sync-free expert path, eager.
SYNC_FREE_PROVIDER = "auto-sync-free"
#: The fastest backend captured in a CUDA graph and replayed (GPU): the inference forward, or the
#: whole training step (forward, loss, backward, a capturable AdamW step).
GRAPHED_PROVIDER = "graphed-auto"
#: A provider with this suffix runs in benchmark mode (GPU): ``torch.backends.cudnn.benchmark``
#: on while it is set up and timed, so cuDNN searches its algorithms and the trunk's
#: convolutions time our kernels against cuDNN's once per shape (``moceir.layers.tuning``).
TUNED = "-tuned"
GRAPHED_TUNED_PROVIDER = GRAPHED_PROVIDER + TUNED
AUTO_TUNED_PROVIDER = "auto" + TUNED
#: Every model provider name (which of them run depends on the device and the build).
MODEL_PROVIDERS = (
    "reference",
    "auto",
    GRAPHED_PROVIDER,
    GRAPHED_TUNED_PROVIDER,
    "cuda",
    "cpu",
    "triton",
    SYNC_FREE_PROVIDER,
    AUTO_TUNED_PROVIDER,
    *COMPILED_PROVIDERS,
)
#: Main workloads: the eager providers run these right after the training step and its compiled
#: reference.
MAIN_WORKLOADS = 3


def plan_jobs(
    wls: list[Workload],
    providers: list[str],
    compile_reference: bool,
    size: str,
    compiled_providers: tuple[str, ...] = COMPILED_PROVIDERS,
) -> list[tuple[Workload, str]]:
    """(workload, provider) in the order they run: the eager providers on the first workload
    marked for compiling (the training step) and its compiled providers, then the eager
    providers on the other main workloads, on the rest, and the other compiled workloads. A
    deadline cuts from the end: a short run still compares the training step with its
    compiled reference (an H100 run that put every main workload first never reached it)."""
    eager = [(wl, p) for wl in wls for p in providers]
    compiled = []
    if compile_reference:
        marked = [wl for wl in wls if wl.compile or size == "tiny"]
        marked.sort(key=lambda wl: wl.kind != "training")  # the training step first (stable)
        # torch.compile of the reference, and of the fastest backend (our custom ops are opaque
        # to Inductor, which fuses the glue around them), per marked workload.
        compiled = [(wl, p) for wl in marked for p in compiled_providers]
    first = len(compiled_providers)
    lead = [job for job in eager if compiled and job[0] is compiled[0][0]]
    main = [job for job in eager if job[0] in wls[:MAIN_WORKLOADS] and job not in lead]
    rest = [job for job in eager if job[0] not in wls[:MAIN_WORKLOADS] and job not in lead]
    return lead + compiled[:first] + main + rest + compiled[first:]


# ----------------------------------------------------------------------------------------------
# Bytes moved: every kernel call's inputs and outputs
# ----------------------------------------------------------------------------------------------

#: Calls that move no data (allocation, aliasing, host reads).
_NO_TRAFFIC = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    # A view whose schema does not say so (matmul reshapes its result with it): no data moves.
    "_unsafe_view",
    "lift_fresh",
    "_local_scalar_dense",
    "set_",
    "resize_",
    "record_stream",
}
#: In-place calls that write their first argument without reading it.
_WRITE_ONLY_FIRST = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_"}


def _tensor_bytes(t: torch.Tensor) -> int:
    logical = t.numel() * t.element_size()
    try:  # a broadcast (stride 0) view reads its storage once, not numel times
        return min(logical, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return logical


def _is_view(func) -> bool:
    is_view = getattr(func, "is_view", None)
    if is_view is not None:
        return bool(is_view)
    returns = func._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


class ByteCounter(TorchDispatchMode):
    """Sums, over every op call, the bytes of its tensor inputs and outputs (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.calls = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _NO_TRAFFIC or _is_view(func):
            return out
        inputs = pytree.tree_leaves((args, kwargs))
        if name in _WRITE_ONLY_FIRST and inputs:
            inputs = inputs[1:]
        moved = sum(_tensor_bytes(t) for t in inputs if isinstance(t, torch.Tensor))
        moved += sum(_tensor_bytes(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        self.total += moved
        self.calls += 1
        self.by_op[f"{func.namespace}::{name}"] += moved
        return out


def count_traffic(fn: Callable[[], object]) -> tuple[int, int, list[dict]]:
    """(bytes moved, op calls, the 10 ops moving most) over one call of ``fn``."""
    counter = ByteCounter()
    with counter:
        fn()
    top = [{"op": op, "bytes": b} for op, b in counter.by_op.most_common(10)]
    return counter.total, counter.calls, top


def count_flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# Where the time goes: self time per module type and per kernel-op call
# ----------------------------------------------------------------------------------------------

#: Functions the model calls outside modules, timed as their own categories where they exist
#: (module, attribute, category). Missing ones (the model's internals move) are skipped.
_FUNCTIONS = (
    ("moceir.layers.attention", "channel_attention_map", "channel attention (normalise, qk^T, softmax)"),
    ("moceir.layers.conv", "apply_attention", "channel attention: attn @ v (unfused)"),
    ("moceir.layers.adapter", "route", "route"),
    ("moceir.layers.adapter", "dispatch", "dispatch"),
    ("moceir.layers.adapter", "combine", "combine"),
    ("moceir.layers.adapter", "routing_aux_loss", "routing aux loss"),
    ("moceir.layers.adapter", "run_experts", "experts: glue (pack, silu, gating, cat)"),
    ("moceir.layers.experts", "grouped_dwconv", "experts: grouped_dwconv"),
    ("moceir.layers.experts", "patch_fft_conv", "experts: patch_fft_conv"),
    ("moceir.layers.experts", "layernorm2d", "layernorm"),
    # The trunk's LayerNorm -> 1x1 and 1x1 -> skip where fused (PointwiseConv2d.fused).
    ("moceir.layers.conv", "fused_pointwise", "conv 1x1 + layernorm / residual (fused)"),
)

_MODULE_LABELS = {
    "LayerNorm2d": "layernorm",
    "Linear": "linear",
    "PixelShuffle": "pixel (un)shuffle",
    "PixelUnshuffle": "pixel (un)shuffle",
    "FeedForward": "ffn gelu gate",
    "EncoderBlock": "residual adds",
    "DecoderBlock": "residual adds",
    "EncoderGroup": "residual adds",
    "DecoderGroup": "residual adds",
    "MoCELayer": "adapter: glue",
    "Router": "route",
    "MoCEIR": "model: pad, concat, crop, checks",
}


def module_label(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0]
        if m.groups > 1 and m.groups == m.in_channels:
            return f"conv depthwise {k}x{k}"
        return f"conv {k}x{k}"
    name = type(m).__name__
    return _MODULE_LABELS.get(name, name)


class Timeline:
    """Nested timed ranges; self time = a range's time minus its children's (GPU: CUDA events)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.records: list[list] = []  # [label, start, end, parent]
        self.stack: list[int] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def enter(self, label: str) -> None:
        self.records.append([label, self._mark(), None, self.stack[-1] if self.stack else -1])
        self.stack.append(len(self.records) - 1)

    def exit(self) -> None:
        self.records[self.stack.pop()][2] = self._mark()

    def self_times_ms(self) -> tuple[dict[str, float], float]:
        """({category: self time in ms}, total of the outermost ranges in ms)."""
        synchronize(self.device)
        inclusive = []
        for _, start, end, _ in self.records:
            inclusive.append(start.elapsed_time(end) if self.cuda else (end - start) * 1e3)
        own = list(inclusive)
        for i, (_, _, _, parent) in enumerate(self.records):
            if parent >= 0:
                own[parent] -= inclusive[i]
        totals: Counter[str] = Counter()
        for (label, *_), t in zip(self.records, own, strict=True):
            totals[label] += t
        root = sum(t for (_, _, _, parent), t in zip(self.records, inclusive, strict=True) if parent < 0)
        return dict(totals), root


@contextlib.contextmanager
def _timed_functions(timeline: Timeline) -> Iterator[None]:
    patched = []
    for module_name, attr, label in _FUNCTIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        original = getattr(module, attr, None)
        if not callable(original):
            continue

        def timed(*args, _fn=original, _label=label, **kwargs):
            timeline.enter(_label)
            try:
                return _fn(*args, **kwargs)
            finally:
                timeline.exit()

        functools.update_wrapper(timed, original)
        setattr(module, attr, timed)
        patched.append((module, attr, original))
    try:
        yield
    finally:
        for module, attr, original in patched:
            setattr(module, attr, original)


def breakdown(model: nn.Module, fn: Callable[[], object], device: torch.device) -> dict:
    """Self time per category over one call of ``fn`` (which runs ``model``)."""
    timeline = Timeline(device)
    handles = []
    for m in model.modules():
        label = module_label(m)
        handles.append(m.register_forward_pre_hook(lambda _m, _a, _label=label: timeline.enter(_label)))
        handles.append(m.register_forward_hook(lambda _m, _a, _o: timeline.exit(), always_call=True))
    try:
        with _timed_functions(timeline):
            fn()
    finally:
        for h in handles:
            h.remove()
    times, total = timeline.self_times_ms()
    rows = [
        {"category": k, "ms": v, "share": v / total if total else None}
        for k, v in sorted(times.items(), key=lambda kv: -kv[1])
    ]
    return {"total_ms": total, "categories": rows}


# ----------------------------------------------------------------------------------------------
# Providers and workloads
# ----------------------------------------------------------------------------------------------


def model_providers(model: moceir.MoCEIR, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Model backends that run a small forward here, and why the others do not."""
    candidates = ["auto", "cuda", "triton"] if device.type == "cuda" else ["auto", "cpu", "triton"]
    usable, unavailable = ["reference"], {}
    x = torch.rand(2, 3, 16, 16, device=device)
    for backend in candidates:
        if backend == "triton" and device.type != "cuda":
            unavailable[backend] = "Triton numbers need a CUDA GPU"
            continue
        try:
            model.set_backend(backend)
            with torch.no_grad():
                model(x)
            usable.append(backend)
        except Exception as e:  # noqa: BLE001  (any failure means: not usable here)
            unavailable[backend] = f"{type(e).__name__}: {e}"[:300]
        finally:
            model.set_backend("reference")
    if "auto" in usable:
        # Right after "auto": a run cut by its deadline still has the graphed step (the H100 run
        # of 2026-11-26 spent its time on cuda and triton and never reached it).
        if device.type == "cuda":
            at = usable.index("auto") + 1
            usable[at:at] = [GRAPHED_PROVIDER, GRAPHED_TUNED_PROVIDER]
        else:
            unavailable[GRAPHED_PROVIDER] = "CUDA graphs need a CUDA GPU"
            for p in (GRAPHED_TUNED_PROVIDER, AUTO_TUNED_PROVIDER):
                unavailable[p] = "benchmark mode times cuDNN and our GPU kernels: GPU only"
        usable.append(SYNC_FREE_PROVIDER)
        if device.type == "cuda":
            usable.append(AUTO_TUNED_PROVIDER)
    return usable, unavailable


def _backend_of(provider: str) -> str:
    """The model backend a provider runs: "compiled-cuda" -> "cuda", "auto-sync-free" -> "auto"."""
    provider = provider.removesuffix(TUNED)
    if provider in (SYNC_FREE_PROVIDER, GRAPHED_PROVIDER):
        return "auto"
    return provider.removeprefix("compiled-")


def is_graphed(provider: str) -> bool:
    """Whether ``provider`` replays a CUDA graph (tuned or not)."""
    return provider.removesuffix(TUNED) == GRAPHED_PROVIDER


@contextlib.contextmanager
def benchmark_mode(provider: str) -> Iterator[dict]:
    """For a ``-tuned`` provider, benchmark mode from a clean slate while the block runs (cuDNN's
    flag restored after it); yields a dict that receives the timed choices, counted per layer
    kind: {"pointwise": {"cudnn": n, "kernel": m}, ...}, and under "ms" each kind's candidates'
    median times summed over its shapes: {"ms": {"pointwise": {"cudnn": t, ...}}}. A no-op for
    the others."""
    report: dict = {}
    if not provider.endswith(TUNED):
        yield report
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    tuning.reset()
    try:
        yield report
    finally:
        torch.backends.cudnn.benchmark = saved
        for key, choice in tuning.choices().items():
            counts = report.setdefault(key[0], {})
            counts[choice] = counts.get(choice, 0) + 1
        for key, times in tuning.timings().items():
            sums = report.setdefault("ms", {}).setdefault(key[0], {})
            for candidate, ms in times.items():
                sums[candidate] = sums.get(candidate, 0.0) + ms
        tuning.reset()


def _peak_bytes(fn: Callable[[], object], device: torch.device, graphed: bool = False) -> int | None:
    """``max_memory_allocated`` over one call of ``fn`` (GPU). A CUDA graph's replay allocates
    nothing: its activations live in the graph's private pool, reserved when it was captured and
    invisible to ``max_memory_allocated``. For a graph, the memory reserved while it is held (the
    cache emptied first, so the pool and the live tensors are what is left) is counted instead:
    an upper bound of its footprint, never a flattering one."""
    if device.type != "cuda":
        return None
    synchronize(device)
    if graphed:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    if graphed:
        peak = max(peak, int(torch.cuda.memory_reserved(device)))
    return peak


def _compile(module: nn.Module, model: moceir.MoCEIR) -> Callable:
    """``torch.compile(module)`` (``model`` or a part of it) from a clean slate: each workload
    compiles for its own shapes. ``dynamic=model.compile_dynamic()``: the reference's per-expert
    image counts (read on the host, changed by the training noise from step to step) compile
    static, as Inductor fails on them made symbolic."""
    import torch._dynamo  # noqa: PLC0415

    torch._dynamo.reset()
    return torch.compile(module, dynamic=model.compile_dynamic())


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


class ModelBench:
    """One MoCE-IR-S (same random weights for every provider) and its workloads."""

    def __init__(
        self,
        device: torch.device,
        ceil: dict,
        min_time_s: float = 0.3,
        min_samples: int = 5,
        overrides: dict | None = None,
    ) -> None:
        torch.manual_seed(0)
        self.device = device
        self.ceil = ceil
        self.min_time_s = min_time_s
        self.min_samples = min_samples
        self.base = moceir.build_model("moce_ir_s", backend="reference", **(overrides or {}))
        self.base = self.base.to(device).eval()
        self._cast: dict[str, nn.Module] = {"float32": self.base}
        self._flops: dict[tuple, float] = {}
        self._adapter_inputs: dict[Workload, tuple[int, tuple[torch.Tensor, ...]]] = {}

    def inference_model(self, precision: str) -> moceir.MoCEIR:
        if precision not in self._cast:
            self._cast[precision] = copy.deepcopy(self.base).to(_dtype(precision))
        return self._cast[precision]

    def _inference_fn(self, wl: Workload, provider: str):
        model = self.inference_model(wl.precision)
        x = torch.rand(wl.shape, device=self.device).to(_dtype(wl.precision))
        model.set_backend(_backend_of(provider))
        model.set_expert_path("sync_free" if provider == SYNC_FREE_PROVIDER else "auto")
        if is_graphed(provider):
            graphed = GraphedInference(model, x)
            return model, graphed.replay
        runner = _compile(model, model) if provider.startswith("compiled-") else model

        def fn():
            with torch.inference_mode():
                return runner(x)

        return model, fn

    def _training_fn(self, wl: Workload, provider: str):
        model = copy.deepcopy(self.base).train()
        model.set_backend(_backend_of(provider))
        model.set_expert_path("sync_free" if provider == SYNC_FREE_PROVIDER else "auto")
        runner = _compile(model, model) if provider.startswith("compiled-") else model
        x = torch.rand(wl.shape, device=self.device)
        y = torch.rand(wl.shape, device=self.device)
        autocast = wl.precision == "bf16-autocast"

        def loss_fn(net, out, target):
            return F.l1_loss(out.float(), target) + 0.01 * net.total_loss

        if is_graphed(provider):
            # The whole step in one CUDA graph: Adam's step must be capturable.
            opt = torch.optim.AdamW(model.parameters(), lr=2e-4, capturable=True)
            graphed = GraphedTrainStep(model, opt, loss_fn, x, y, torch.bfloat16 if autocast else None)
            return model, graphed.replay
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(model, runner(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return model, step

    def adapter_inputs(self, wl: Workload) -> tuple[int, tuple[torch.Tensor, ...]]:
        """Index (in ``model.adapters()``) of the first adapter of decoder level ``wl.level``,
        and the inputs (x, freq_emb, shared) a forward of ``wl.shape`` gives it (one forward per
        workload, shared by its providers)."""
        if wl not in self._adapter_inputs:
            self._adapter_inputs[wl] = self._capture_adapter_inputs(wl)
        return self._adapter_inputs[wl]

    def _capture_adapter_inputs(self, wl: Workload) -> tuple[int, tuple[torch.Tensor, ...]]:
        inputs: list[tuple[torch.Tensor, ...]] = []
        hooks = [
            a.register_forward_pre_hook(lambda _m, args: inputs.append(tuple(t.detach() for t in args)))
            for a in self.base.adapters()
        ]
        try:
            torch.manual_seed(0)
            with torch.no_grad():
                self.base(torch.rand(wl.shape, device=self.device))
        finally:
            for h in hooks:
                h.remove()
        widths: list[int] = []  # one per decoder level, deepest first (the adapters' order)
        for args in inputs:
            if args[0].shape[1] not in widths:
                widths.append(args[0].shape[1])
        if not 1 <= wl.level <= len(widths):
            raise ValueError(f"level must be 1..{len(widths)} (the decoder levels), got {wl.level}")
        index = next(i for i, args in enumerate(inputs) if args[0].shape[1] == widths[wl.level - 1])
        return index, inputs[index]

    def _adapter_fn(self, wl: Workload, provider: str):
        model = copy.deepcopy(self.base).train()
        model.set_backend(_backend_of(provider))
        model.set_expert_path("sync_free" if provider == SYNC_FREE_PROVIDER else "auto")
        index, (x, freq_emb, shared) = self.adapter_inputs(wl)
        adapter = model.adapters()[index]
        runner = _compile(adapter, model) if provider.startswith("compiled-") else adapter
        x, shared = x.clone().requires_grad_(True), shared.clone().requires_grad_(True)
        wrt = [x, shared, *adapter.parameters()]
        autocast = wl.precision == "bf16-autocast"

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                out = runner(x, freq_emb, shared)
                loss = out.float().square().mean() + 0.01 * adapter.loss
            # Experts no image chose get no gradient on the per-expert path.
            return torch.autograd.grad(loss, wrt, allow_unused=True)

        return model, step

    def step_fn(self, wl: Workload, provider: str) -> tuple[nn.Module, Callable[[], object]]:
        """(model, one call of ``wl`` with ``provider``): what ``run`` times and the profiler traces."""
        make = {"training": self._training_fn, "adapter": self._adapter_fn}.get(wl.kind, self._inference_fn)
        return make(wl, provider)

    def run(self, wl: Workload, provider: str) -> dict:
        """Time ``wl`` with ``provider``; returns the result row (without suite/status keys)."""
        with benchmark_mode(provider) as choices:
            row = self._run(wl, provider)
        if choices:
            row["tuned_choices"] = choices
        return row

    def _run(self, wl: Workload, provider: str) -> dict:
        model, fn = self.step_fn(wl, provider)
        start = time.perf_counter()
        fn()  # the first call compiles (torch.compile, Triton JIT) and warms the allocator
        synchronize(self.device)
        first_s = time.perf_counter() - start
        t = measure(fn, self.device, min_time_s=self.min_time_s, min_samples=self.min_samples, warmup=0)
        row = {
            "median_ms": t.median_ms,
            "p20_ms": t.p20_ms,
            "p80_ms": t.p80_ms,
            "samples": t.samples,
            "first_call_s": first_s,
            "peak_bytes": _peak_bytes(fn, self.device, graphed=is_graphed(provider)),
            "images_per_s": wl.batch / t.median_ms * 1e3,
        }
        if is_graphed(provider) and self.device.type == "cuda":
            row["peak_kind"] = "reserved"  # the report tells these from older replay-only peaks
        if wl.kind == "video":
            row["frames_per_s"] = 1e3 / t.median_ms
            if not provider.startswith("compiled-") and not is_graphed(provider):
                row |= self._video_extras(wl, model, fn, provider)
                row["roofline_fraction"] = row["roofline_ms"] / t.median_ms
        if wl.kind == "training":
            model.zero_grad(set_to_none=True)
        return row

    def _video_extras(self, wl: Workload, model: nn.Module, fn: Callable, provider: str) -> dict:
        moved, calls, top = count_traffic(fn)
        key = (wl.precision, wl.height, wl.width)
        if key not in self._flops:
            self._flops[key] = count_flops(fn)
        flops = self._flops[key]
        dtype_name = str(_dtype(wl.precision)).removeprefix("torch.")
        floor = roofline_ms(moved, flops, dtype_name, self.ceil)
        with torch.inference_mode():
            split = breakdown(model, fn, self.device)
        return {
            "bytes_per_frame": moved,
            "op_calls_per_frame": calls,
            "top_ops_by_bytes": top,
            "flops_per_frame": flops,
            "bandwidth_bound_fps": self.ceil["copy_gb_per_s"] * 1e9 / moved if moved else None,
            "roofline_ms": floor,
            "breakdown": split,
        }


def _isolated_job(conn, settings: dict, wl: Workload, provider: str) -> None:
    """``ModelBench(**settings).run(wl, provider)`` in a process of its own (see run_isolated)."""
    try:
        bench = ModelBench(torch.device(settings.pop("device")), **settings)
        conn.send(("ok", bench.run(wl, provider)))
    except Exception as e:  # noqa: BLE001  (sent back as the job's error)
        conn.send(("error", f"{type(e).__name__}: {e}"[:500]))
    finally:
        conn.close()


def run_isolated(settings: dict, wl: Workload, provider: str, timeout_s: float, target=_isolated_job) -> dict:
    """Run one job in a fresh process (spawned: a CUDA context must not be forked) and return
    its row. On an H100, Inductor compiling the reference aborted the whole process ("trying to
    set the current FakeTensorMode, but one already exists"); run there, such a crash costs one
    row instead of the rest of the run. The ModelBench of ``settings`` (device, ceil, min_time_s,
    min_samples, overrides) rebuilds the same weights (seeded). RuntimeError when the job fails,
    the process dies or ``timeout_s`` passes (the process is then ended)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(child, dict(settings), wl, provider), daemon=True)
    proc.start()
    child.close()
    status, payload, timed_out = None, None, False
    try:
        # poll is True for a message and for the end of the pipe (the process exited); False only
        # when the time ran out. Decided by that, not by is_alive(): a process whose pipe just
        # closed may not have been reaped yet, and a crash must not read as a timeout.
        timed_out = not parent.poll(None if math.isinf(timeout_s) else max(timeout_s, 0.0))
        if not timed_out:
            status, payload = parent.recv()
    except EOFError:  # the process ended without a word: it crashed
        pass
    finally:
        if timed_out and proc.is_alive():
            proc.terminate()
        proc.join(10)
        parent.close()
    if status == "ok":
        return payload
    if status == "error":
        raise RuntimeError(payload)
    if timed_out:
        raise RuntimeError(f"timed out after {timeout_s:.0f} s in its own process")
    raise RuntimeError(f"its process died (exit code {proc.exitcode}; a crash inside torch?)")


def run_models(
    device: torch.device,
    size: str,
    ceil: dict,
    emit: Callable[[dict], None],
    deadline: Deadline,
    compile_reference: bool | None = None,
    kinds: tuple[str, ...] = ("inference", "training", "video", "adapter"),
    min_time_s: float = 0.3,
    min_samples: int = 5,
    only: tuple[str, ...] | None = None,
) -> dict[str, str]:
    """Run every workload with every usable provider (or those of ``only``, in the usual
    order); each row goes to ``emit``."""
    # Toy sizes check the plumbing: a narrow, one-block-per-level network keeps them fast.
    overrides = TINY_OVERRIDES if size == "tiny" else {}
    model_name = "moce_ir_s" + "".join(f" {k}={v}" for k, v in overrides.items())
    bench = ModelBench(device, ceil, min_time_s, min_samples, overrides)
    providers, unavailable = model_providers(bench.base, device)
    if compile_reference is None:
        compile_reference = device.type == "cuda"
    if not compile_reference:
        for p in COMPILED_PROVIDERS:
            unavailable[p] = "torch.compile is timed on GPU only (--compile forces it)"
    cost_s: dict[tuple, float] = {}  # measured cost of each job, to skip what cannot fit
    chosen = [wl for wl in workloads(device, size) if wl.kind in kinds]
    compiled_providers = COMPILED_PROVIDERS
    if only is not None:
        providers = [p for p in providers if p in only]
        compiled_providers = tuple(p for p in COMPILED_PROVIDERS if p in only)
    for wl, provider in plan_jobs(chosen, providers, compile_reference, size, compiled_providers):
        base = {
            "suite": "models",
            "model": model_name,
            "workload": wl.kind,
            "case": wl.case,
            "shape": wl.shape,
            "precision": wl.precision,
            "provider": provider,
        }
        if wl.scaled_from:
            base["scaled_from"] = list(wl.scaled_from)
        if is_graphed(provider) and wl.kind == "adapter":
            emit(base | {"status": "skipped", "error": "graphed-auto captures whole steps, not one adapter"})
            continue
        compiling = provider.startswith("compiled-") and size != "tiny"
        # An eager job needs about what the reference took on this workload (before it has run:
        # what the last job took), twice over for safety.
        last = list(cost_s.values())[-1] if cost_s else 2.5
        need = COMPILE_NEEDS_S if compiling else 2 * cost_s.get((wl, "reference"), last)
        if not deadline.allows(need):
            emit(base | {"status": "skipped", "error": f"out of time budget (needs ~{need:.0f} s)"})
            continue
        start = time.perf_counter()
        try:
            if device.type == "cuda" and provider.startswith("compiled-"):
                settings = {"device": str(device), "ceil": ceil, "min_time_s": min_time_s,
                            "min_samples": min_samples, "overrides": overrides}  # fmt: skip
                row = run_isolated(settings, wl, provider, deadline.remaining())
            else:
                row = bench.run(wl, provider)
        except Exception as e:  # noqa: BLE001  (a broken backend must not stop the run)
            emit(base | {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]})
        else:
            emit(base | {"status": "ok"} | row)
        finally:
            cost_s[(wl, provider)] = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return unavailable
