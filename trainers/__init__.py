"""Compatibility losses and the training loop that pulls a query net into the gallery space."""

from __future__ import annotations

from trainers._base import CompatibilityLoss, GalleryTargets
from trainers._losses import (
    BackwardCompatibleLoss,
    ContextualSimilarityLoss,
    ContrastiveLoss,
    RegressionLoss,
    RelationalLoss,
    WeightedSum,
    create_loss,
    create_loss_from_config,
    list_losses,
    register_loss,
)
from trainers._checkpoint import CheckpointError, check_state_dict, checkpoint_extra, load_checkpoint, read_safetensors, save_checkpoint, state_dict_mismatch
from trainers._speed import CPU_DEFAULT_PRECISION, PRECISIONS, Speed, resolve_precision
from trainers._train import EpochResult, TensorImages, TrainingDiverged, TrainingImages, WeightAverage, make_optimizer, make_scheduler, train_compatible

__all__ = [
    "BackwardCompatibleLoss",
    "CheckpointError",
    "check_state_dict",
    "checkpoint_extra",
    "read_safetensors",
    "state_dict_mismatch",
    "load_checkpoint",
    "save_checkpoint",
    "CPU_DEFAULT_PRECISION",
    "PRECISIONS",
    "Speed",
    "resolve_precision",
    "CompatibilityLoss",
    "ContextualSimilarityLoss",
    "ContrastiveLoss",
    "EpochResult",
    "GalleryTargets",
    "RegressionLoss",
    "RelationalLoss",
    "TensorImages",
    "TrainingDiverged",
    "TrainingImages",
    "WeightAverage",
    "WeightedSum",
    "create_loss",
    "create_loss_from_config",
    "list_losses",
    "make_optimizer",
    "make_scheduler",
    "register_loss",
    "train_compatible",
]
