"""Neural architecture search for query networks in asymmetric image retrieval.

The study driver, hardware budgets, retrieval scoring, MLflow tracking, export and the
``nas`` command line. Search spaces live in :mod:`search_spaces`, compatibility losses
and training in :mod:`trainers`.
"""

from __future__ import annotations

from nas.config import ExperimentConfig, load_config
from nas.errors import NasError
from nas.export import export_trial, load_query_model

__all__ = ["ExperimentConfig", "NasError", "export_trial", "load_config", "load_query_model"]
__version__ = "0.1.0"
