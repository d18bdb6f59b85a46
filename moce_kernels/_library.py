"""The torch.library glue every op's compiled and Triton bindings share.

Each op ``<op>`` is a pair of ops, ``<op>_fwd`` and ``<op>_bwd``, in two namespaces:

- ``moce::``: defined with their CPU and CUDA kernels by ``moce_kernels._C`` (``csrc/``);
  :func:`register_compiled` adds the fake (meta) implementations for torch.compile and the
  autograd formula.
- ``moce_triton::``: :func:`define_triton` defines them from Python functions with
  ``torch.library.custom_op`` + ``register_fake`` rather than ``triton_op``: under the Triton
  interpreter (CPU CI) only this pair passes ``opcheck`` and torch.compile (``triton_op``'s fake
  path launches the kernel on fake tensors), at the price of Inductor treating the op as opaque
  on a GPU.

In both, the forward's autograd formula calls the backward op, which itself is not
differentiable: double backward raises a clear error (use backend='reference'). Each op is
registered once per process, so reloading a binding module (``importlib.reload``, a second import
under another name) neither registers twice nor fails.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from moce_kernels import _extension

#: ``make_backward(bwd_op) -> backward``: the forward op's autograd formula, calling ``bwd_op``.
BackwardFactory = Callable[[Callable[..., Any]], Callable[..., Any]]


def no_double_backward(op: str, kernels: str) -> Callable[..., Any]:
    """The autograd formula of a backward op: raises RuntimeError (``op`` is e.g. ``moce::route``)."""

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: double backward (differentiating the gradient) is not supported by the "
            f"{kernels} kernels; use backend='reference'"
        )

    return _no_double_backward


def _save_nothing(ctx, inputs, output) -> None:
    """setup_context of a backward op: its formula only raises."""


def register_compiled(
    name: str, fwd_fake: Callable[..., Any], bwd_fake: Callable[..., Any], autograd: ModuleType
) -> None:
    """Fake implementations and autograd of ``moce::<name>_fwd`` / ``_bwd`` (once per process).

    ``autograd``: the op's ``_autograd`` module (``setup_context`` and ``make_backward``).
    Raises RuntimeError (saying how to build it) when ``moce_kernels._C`` is not built.
    """
    C = _extension.require("cpu")
    # The flag lives on the extension module, which is never re-imported.
    flag = f"_{name}_registered"
    if getattr(C, flag, False):
        return
    fwd, bwd = f"moce::{name}_fwd", f"moce::{name}_bwd"
    torch.library.register_fake(fwd, fwd_fake)
    torch.library.register_fake(bwd, bwd_fake)
    backward = autograd.make_backward(getattr(torch.ops.moce, f"{name}_bwd"))
    torch.library.register_autograd(fwd, backward, setup_context=autograd.setup_context)
    torch.library.register_autograd(
        bwd, no_double_backward(f"moce::{name}", "compiled"), setup_context=_save_nothing
    )
    setattr(C, flag, True)


def define_triton(
    name: str,
    fwd: Callable[..., Any],
    bwd: Callable[..., Any],
    fwd_fake: Callable[..., Any],
    bwd_fake: Callable[..., Any],
    autograd: ModuleType,
    *,
    make_backward: BackwardFactory | None = None,
) -> Callable[..., Any]:
    """Define ``moce_triton::<name>_fwd`` / ``_bwd`` from ``fwd`` / ``bwd`` (once per process).

    The schemas come from the type annotations of ``fwd`` and ``bwd``. ``autograd``: the op's
    ``_autograd`` module; ``make_backward`` replaces its ``make_backward``. Returns the forward
    op (callable like ``torch.ops.moce_triton.<name>_fwd``); when the ops already exist (a
    reload), the existing one.
    """
    namespace = torch.ops.moce_triton
    if hasattr(namespace, f"{name}_fwd"):
        return getattr(namespace, f"{name}_fwd")
    fwd_op = torch.library.custom_op(f"moce_triton::{name}_fwd", mutates_args=())(fwd)
    bwd_op = torch.library.custom_op(f"moce_triton::{name}_bwd", mutates_args=())(bwd)
    fwd_op.register_fake(fwd_fake)
    bwd_op.register_fake(bwd_fake)
    backward = (make_backward or autograd.make_backward)(getattr(namespace, f"{name}_bwd"))
    fwd_op.register_autograd(backward, setup_context=autograd.setup_context)
    bwd_op.register_autograd(
        no_double_backward(f"moce_triton::{name}", "Triton"), setup_context=_save_nothing
    )
    return fwd_op
