"""Resumable training checkpoints without pickle: tensors in one safetensors file, everything else as JSON in its metadata.

A checkpoint holds a model's ``state_dict``, an optimizer's and a learning-rate scheduler's
state and any JSON-able extra (history, epoch). Optimizer state tensors (momentum buffers,
Adam moments, step counts) are stored as ``optimizer/<param>/<name>``; the optimizer's
parameter groups and the scheduler's state (numbers and lists) as JSON. Reading never
unpickles anything; every model tensor is checked by name and shape before any is loaded,
and a damaged or foreign file is a :class:`CheckpointError` that says which file to delete.

:func:`read_safetensors` and :func:`check_state_dict` are the same checks for every other
weights file the tool reads back (gallery checkpoints and weights, trained supernets, trial
weights, exports): a file that cannot be read, or a state dict whose names, shapes or kinds
(floating point, integer, boolean) differ from the module's own, is an error (of the
caller's type) naming the file, the first differing names, and what to delete or rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "checkpoint_extra", "read_safetensors", "check_state_dict", "state_dict_mismatch"]

_FORMAT = "asymnas-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what it is loaded into; the message says what to delete."""


def read_safetensors(path: Path, what: str, advice: str, error: type[Exception] = CheckpointError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of the safetensors file ``path`` (nothing unpickled).

    A missing, cut or foreign file is ``error`` saying ``"<what> <path> cannot be read (...); <advice>."``.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise error(f"{what} {path} cannot be read ({type(exc).__name__}: {first}); it is damaged (cut short by a kill or a full "
                    f"disk) or not a safetensors file: {advice}.") from None
    return tensors, metadata


def _kind(tensor: torch.Tensor) -> str:
    return "bool" if tensor.dtype == torch.bool else "float" if tensor.is_floating_point() or tensor.is_complex() else "int"


def state_dict_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], optional: tuple[str, ...] = ()) -> str:
    """What keeps ``state`` from loading into a module whose own state dict is ``expected``: missing,
    unexpected, mis-shaped and mis-typed names (the first three of each, and how many), or ``""`` when it fits.
    Names ending in one of ``optional`` may be missing (e.g. batch norm's ``num_batches_tracked``)."""
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    kinds = [f"{k} {state[k].dtype} (expected {v.dtype})" for k, v in expected.items() if k in state and _kind(state[k]) != _kind(v)]
    parts = [f"{label} {', '.join(keys[:3])}" + (f" ({len(keys)} in all)" if len(keys) > 3 else "")
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong), ("wrong type", kinds)) if keys]
    return "; ".join(parts)


def check_state_dict(state: dict[str, torch.Tensor], module: nn.Module | dict[str, torch.Tensor], what: str, advice: str,
                     error: type[Exception] = CheckpointError, target: str = "this network", optional: tuple[str, ...] = ()) -> None:
    """Raise ``error`` ("<what> does not fit <target> (<mismatch>); <advice>.") unless ``state`` fits ``module``
    name by name, shape by shape and kind by kind; after it, ``module.load_state_dict(state)`` cannot fail."""
    expected = module.state_dict() if isinstance(module, nn.Module) else module
    problem = state_dict_mismatch(state, expected, optional)
    if problem:
        raise error(f"{what} does not fit {target} ({problem}); {advice}.")


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
    tensors, metadata = read_safetensors(path, "The checkpoint", advice)
    try:
        if metadata.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is not a training checkpoint of this tool (format {metadata.get('format')!r}); {advice}.")
        param_groups = json.loads(metadata["param_groups"])
        sched_state = json.loads(metadata["scheduler"])
        extra = json.loads(metadata["extra"])
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"The checkpoint {path} has a damaged header ({type(exc).__name__}: {exc}): {advice}.") from None
    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    check_state_dict(state, model, f"The checkpoint {path}", advice)
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
