"""Loading and saving weights safely: never unpickles arbitrary objects.

Reads the official Lightning checkpoints (``last.ckpt``: a dict whose ``state_dict`` holds the
tensors with the prefix ``net.``), plain ``torch.save`` state dicts, and safetensors files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moceir.config import CONFIG_FIELDS, MoCEIRConfig

#: Prefixes the official training wrapper puts before the network's own keys.
KNOWN_PREFIXES = ("net.", "model.", "module.")


def _sniff(path: Path) -> str:
    """What the file holds, from its first bytes: "torch" (a zip archive, as ``torch.save`` writes,
    or a legacy pickle), "safetensors", "empty" or "unknown". The name's suffix is not trusted."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x80")):  # zip; pickle protocol >= 2
        return "torch"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    return "unknown"


def _not_a_checkpoint(path: Path) -> ValueError:
    with open(path, "rb") as f:
        head = f.read(16)
    return ValueError(
        f"cannot read checkpoint {path}: not a checkpoint file (neither a torch zip/pickle of tensors "
        f"nor safetensors; it starts with {head!r})"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file, stripping the official ``net.`` prefix.

    The format comes from the file's first bytes (a torch zip or pickle, or safetensors), so a
    ``.pt`` file holding safetensors loads too; the suffix decides only for unrecognised content.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty, truncated or corrupt file, a file that is not a checkpoint at all
            (text, say), an object that is not a state dict, or a pickle that needs code beyond
            plain containers and tensors (refused, never executed). The message names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        kind = _sniff(path)
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if kind == "empty":
        if path.suffix == ".safetensors":
            raise ValueError(f"cannot read safetensors checkpoint {path}: the file is empty")
        raise ValueError(f"cannot read checkpoint {path} (truncated or not a torch file?): the file is empty")
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors checkpoint {path}: {e}") from e
    else:
        try:
            # Lightning stores hyper-parameters as argparse.Namespace: plain data, safe to allow.
            # (From an open file: torch.load would hand a ``.safetensors`` name to safetensors.)
            with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (the unpickler raises anything on garbage)
            if kind == "unknown":  # not a torch file to begin with (text, say)
                raise _not_a_checkpoint(path) from e
            if isinstance(e, pickle.UnpicklingError):
                raise ValueError(
                    f"refusing to load {path}: it holds objects other than tensors and plain "
                    f"containers (loading it would run code from the file). Details: {e}"
                ) from e
            raise ValueError(
                f"cannot read checkpoint {path} (truncated or not a torch file?): {type(e).__name__}: {e}"
            ) from e
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


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct indices ``i`` for which some key matches ``pattern`` (with ``(\\d+)``)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_config(state: dict[str, torch.Tensor]) -> MoCEIRConfig:
    """The architecture a MoCE-IR state dict was saved from (widths, depths, heads, experts).

    ``top_k`` and the routing options are not stored in the tensors: they keep their defaults.
    Raises ValueError for a state dict that is not MoCE-IR's.
    """
    try:
        dim, in_channels = state["patch_embed.proj.weight"].shape[:2]
        out_channels = state["output.weight"].shape[0]
        levels = _count(state, r"enc\.(\d+)\.0\.") + 1
        num_blocks = tuple(_count(state, rf"enc\.{i}\.0\.layers\.(\d+)\.") for i in range(levels - 1))
        num_blocks += (_count(state, r"latent\.layers\.(\d+)\."),)
        num_dec = tuple(_count(state, rf"dec\.{i}\.2\.layers\.(\d+)\.") for i in range(levels - 1))
        heads = tuple(state[f"enc.{i}.0.layers.0.mixer.temperature"].shape[0] for i in range(levels - 1))
        heads += (state["latent.layers.0.mixer.temperature"].shape[0],)
        num_experts = state["dec.0.2.layers.0.adapter.routing.complexity"].shape[0]
        expansion = state["enc.0.0.layers.0.ffn.project_out.weight"].shape[1] / dim
    except KeyError as e:
        raise ValueError(f"not a MoCE-IR state dict: key {e} is missing") from e
    return MoCEIRConfig(
        dim=int(dim),
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        num_blocks=num_blocks,
        num_dec_blocks=num_dec,
        num_refinement_blocks=_count(state, r"refinement\.layers\.(\d+)\."),
        heads=heads,
        ffn_expansion=float(expansion),
        num_experts=int(num_experts),
    )


def _stored_config(path: Path) -> dict:
    """Configuration fields saved by ``save_checkpoint`` in the safetensors metadata, if any."""
    if _sniff(path) != "safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    fields = json.loads(meta.get("moceir_config", "{}"))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in CONFIG_FIELDS}


def load_checkpoint(
    model_or_path: nn.Module | str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    strict: bool = True,
    backend: str = "auto",
) -> nn.Module:
    """Load weights (official ``last.ckpt``, .pt/.pth, or .safetensors).

    ``load_checkpoint(model, path)`` loads into ``model``; ``load_checkpoint(path)`` builds the
    model the file describes (MoCE-IR-S or MoCE-IR, inferred from the tensors and the saved
    configuration) and loads it with ``strict=True``.

    Raises:
        FileNotFoundError / ValueError: see :func:`read_state_dict`; ValueError listing missing or
            unexpected keys and mismatched shapes when the file does not fit the model.
    """
    if path is None:
        from moceir.model import MoCEIR  # noqa: PLC0415  (model imports this module)

        src = Path(model_or_path)
        state = read_state_dict(src)
        config = dataclasses.replace(infer_config(state), **_stored_config(src))
        model = MoCEIR(config, backend=backend)
        _load_into(model, state, src, strict=True)
        return model
    if not isinstance(model_or_path, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model_or_path).__name__}")
    _load_into(model_or_path, read_state_dict(path), path, strict)
    return model_or_path


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path, strict: bool) -> None:
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


def save_checkpoint(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model's weights as safetensors, atomically (temporary file, then rename).

    The model's configuration (``model.config``, when it has one) goes into the file's metadata,
    so ``load_checkpoint(path)`` rebuilds the same model.
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
        config = getattr(model, "config", None)
        meta = {"moceir_config": json.dumps(dataclasses.asdict(config))} if config is not None else None
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
