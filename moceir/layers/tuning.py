"""Timed choices between implementations of one layer call: benchmark mode for our kernels.

``torch.backends.cudnn.benchmark = True`` asks cuDNN to time its algorithms for each new input
shape and keep the fastest. The layers with a kernel of ours and a cuDNN one (the trunk's 1x1
and depthwise convolutions) follow the same switch on a GPU with ``backend="auto"``: the first
call of a shape runs each candidate a few times on the current stream, and the fastest serves
that shape from then on, in this process. With the switch off (PyTorch's default) they run their
fixed default, so a run's numerics depend on nothing timed.

No trial runs while a CUDA graph is being captured: the choice of an earlier eager call (a
graph's warm-up) serves there, else the default. torch.compile always traces the default (the
choices live in a Python dict that a compiled graph would not re-read).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import torch

#: (layer kind, shapes, dtypes, device, ...) -> the candidate chosen for it.
_CHOICES: dict[Hashable, str] = {}
#: The same keys -> each candidate's median time (ms) when the choice was made.
_TIMES: dict[Hashable, dict[str, float]] = {}
#: Calls timed per candidate, after one untimed call (which also compiles a Triton kernel).
TIMED_CALLS = 5


def enabled(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may be timed now: benchmark mode on, a CUDA tensor, not inside
    a CUDA graph capture or a torch.compile trace."""
    if torch.compiler.is_compiling() or not x.is_cuda or not torch.backends.cudnn.benchmark:
        return False
    return not torch.cuda.is_current_stream_capturing()


def in_use(x: torch.Tensor) -> bool:
    """Whether a layer's call on ``x`` needs :func:`choose` at all: a choice was made earlier or
    one can be timed now. Lets the layers skip building the key and candidates at every call
    while benchmark mode is off (the eager forward is host-bound on a GPU)."""
    if torch.compiler.is_compiling():
        return False
    return bool(_CHOICES) or enabled(x)


def choose(
    key: Hashable, candidates: Mapping[str, Callable[[], object]], default: str, x: torch.Tensor
) -> str:
    """The candidate that serves ``key``: the one chosen earlier, else (when :func:`enabled`)
    the fastest of ``candidates`` timed now, else ``default``.

    ``candidates``: name -> a call with no arguments running that implementation on the real
    inputs; each runs ``TIMED_CALLS + 1`` times without autograd.
    """
    if torch.compiler.is_compiling():
        return default
    chosen = _CHOICES.get(key)
    if chosen is not None:
        return chosen
    if not enabled(x):
        return default
    times = {name: _median_ms(call) for name, call in candidates.items()}
    chosen = min(times, key=times.__getitem__)
    _CHOICES[key] = chosen
    _TIMES[key] = times
    return chosen


def choices() -> dict[Hashable, str]:
    """A copy of every choice made in this process (for reports and tests)."""
    return dict(_CHOICES)


def timings() -> dict[Hashable, dict[str, float]]:
    """Each timed choice's candidates and their median times in ms (a copy; for reports)."""
    return {key: dict(times) for key, times in _TIMES.items()}


def reset() -> None:
    """Forget every choice: the next call of each shape times its candidates again."""
    _CHOICES.clear()
    _TIMES.clear()


def _median_ms(call: Callable[[], object]) -> float:
    stream = torch.cuda.current_stream()
    with torch.no_grad():
        call()  # warm-up: kernel compilation and cuDNN's own algorithm search
        times = []
        for _ in range(TIMED_CALLS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            call()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
