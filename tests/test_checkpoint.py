"""trainers.save_checkpoint / load_checkpoint: resumable training state without pickle, checked before use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from trainers import CheckpointError, checkpoint_extra, load_checkpoint, make_optimizer, make_scheduler, save_checkpoint


def _training(seed: int, width: int = 8) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.Linear(width, 2))
    opt = make_optimizer(model, "adamw", 0.01, 0.0, 0.9)
    return model, opt, make_scheduler(opt, "cosine", 10)


def _steps(model: nn.Module, opt, sched, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()


def test_a_resumed_training_continues_exactly_as_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = _training(0)
    _steps(*whole, 6)
    first = _training(0)
    _steps(*first, 3)
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, *first, {"epoch": 3, "history": [{"loss": 1.5}]})
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle
    resumed = _training(1)  # other weights, fresh optimizer state
    extra = load_checkpoint(path, *resumed)
    assert extra == {"epoch": 3, "history": [{"loss": 1.5}]} and checkpoint_extra(path) == extra
    _steps(*resumed, 3, start=3)
    for a, b in zip(whole[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)


def test_a_damaged_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, *_training(0), {"epoch": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut by a kill
    with pytest.raises(CheckpointError, match=f"cannot be read .*delete {path}"):
        load_checkpoint(path, *_training(0))
    save_checkpoint(path, *_training(0, width=16), {"epoch": 1})
    with pytest.raises(CheckpointError, match=r"does not fit this network \(wrong shape 0.weight \(16, 4\) \(expected \(8, 4\)\)"):
        load_checkpoint(path, *_training(0))
