"""Resumable training checkpoints without pickle: tensors in one safetensors file, everything else as JSON in its metadata.

A checkpoint holds a model's ``state_dict``, an optimizer's and a learning-rate scheduler's
state and any JSON-able extra (history, epoch). Optimizer state tensors (momentum buffers,
Adam moments, step counts) are stored as ``optimizer/<param>/<name>``; the optimizer's
parameter groups and the scheduler's state (numbers and lists) as JSON. Reading never
unpickles anything; every model tensor is checked by name and shape before any is loaded,
and a damaged or foreign file is a :class:`CheckpointError` that says which file to delete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "checkpoint_extra"]

_FORMAT = "asymnas-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what it is loaded into; the message says what to delete."""


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None, extra: dict[str, Any]) -> None:
    """Write the checkpoint atomically (a temporary file, then renamed): a kill leaves the previous one intact."""
    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            if value is None:  # e.g. SGD without momentum: read back as absent, which it treats the same
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optimizer/{index}/{name}"] = value.detach().contiguous().cpu()
    metadata = {
        "format": _FORMAT,
        "param_groups": json.dumps(opt["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else None),
        "extra": json.dumps(extra),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``model``, ``optimizer`` and ``scheduler``; return its extra."""
    advice = f"delete {path} to start that training over"
    try:
        tensors = load_file(str(path))
        metadata = _metadata(path)
        if metadata.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is not a training checkpoint of this tool (format {metadata.get('format')!r}); {advice}.")
        param_groups = json.loads(metadata["param_groups"])
        sched_state = json.loads(metadata["scheduler"])
        extra = json.loads(metadata["extra"])
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"The checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); it is damaged (a kill while "
                              f"writing it, or a full disk): {advice}.") from None
    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                 f"wrong shape {', '.join(wrong[:3])}" if wrong else ""]
        raise CheckpointError(f"The checkpoint {path} does not fit this network ({'; '.join(p for p in parts if p)}); {advice}.")
    model.load_state_dict(state)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            opt_state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
        if scheduler is not None and sched_state is not None:
            scheduler.load_state_dict(sched_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"The optimizer state in {path} does not fit this training ({exc}); {advice}.") from None
    return extra


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (its header's ``__metadata__``), read without loading any tensor."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return header.get("__metadata__") or {}


def checkpoint_extra(path: Path) -> dict[str, Any]:
    """The extra a checkpoint was saved with (e.g. its epoch), without loading its tensors."""
    return json.loads(_metadata(path)["extra"])
