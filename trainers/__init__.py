"""Compatibility losses and the training loop that pulls a query net into the gallery space."""

from __future__ import annotations

from trainers._base import CompatibilityLoss
from trainers._losses import RegressionLoss, create_loss, list_losses, register_loss
from trainers._train import EpochResult, TrainingDiverged, train_compatible

__all__ = [
    "CompatibilityLoss",
    "EpochResult",
    "RegressionLoss",
    "TrainingDiverged",
    "create_loss",
    "list_losses",
    "register_loss",
    "train_compatible",
]
