"""Loading and saving weights safely: never unpickles arbitrary objects.

Reads the official Lightning checkpoints (``last.ckpt``: a dict whose ``state_dict`` holds the
tensors with the prefix ``net.``), plain ``torch.save`` state dicts, and safetensors files.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

#: Prefixes the official training wrapper puts before the network's own keys.
KNOWN_PREFIXES = ("net.", "model.", "module.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file, stripping the official ``net.`` prefix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or corrupt file, an object that is not a state dict, or a pickle
            that needs code beyond plain containers and tensors (refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors checkpoint {path}: {e}") from e
    else:
        try:
            # Lightning stores hyper-parameters as argparse.Namespace: plain data, safe to allow.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"refusing to load {path}: it holds objects other than tensors and plain containers "
                f"(loading it would run code from the file). Details: {e}"
            ) from e
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"cannot read checkpoint {path} (truncated or not a torch file?): {e}") from e
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
        state = obj
    return _strip_prefix(state)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in KNOWN_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    # Lightning may keep other modules (a loss, say) beside ``net.``: keep the network's keys.
    net = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    return net or state


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (official ``last.ckpt``, .pt/.pth, .safetensors).

    Raises ValueError listing missing/unexpected keys or mismatched shapes (with ``strict``).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or (strict and (missing or unexpected)):
        details = []
        if mismatched:
            details.append("shape mismatches: " + "; ".join(mismatched[:5]))
        if missing:
            details.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        raise ValueError(
            f"checkpoint {path} does not fit this model ({type(model).__name__}): "
            + "; ".join(details)
            + ". Is it the other configuration (moce_ir_s vs moce_ir)?"
        )
    model.load_state_dict(state, strict=strict)
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model's weights as safetensors, atomically (temporary file, then rename).

    Raises FileExistsError rather than replace an existing file, unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
