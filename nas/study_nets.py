"""The networks an experiment file implies, shaped as the study shapes them.

One place says what the study's gallery model and search space are, so that every figure
of them agrees (the study's ``Gallery model: ... MFLOPs``, ``nas profile``, ``nas space
show``, a supernet's count of its members):

* :func:`gallery_width`: the embedding size (``gallery.embed_dim``, or the width of the
  gallery model's pooled features when it is null);
* :func:`gallery_architecture`: the gallery model as the study embeds it: ``gallery.model``
  with the data's input channels and its own embedding layer (a projection to
  ``gallery.embed_dim``, or none: the pooled features, L2-normalised), at
  ``gallery.resolution``. Its MFLOPs include that embedding layer;
* :func:`space_options` and :func:`study_space`: the search space with the options the
  study gives it (the ``gallery`` and ``pruned`` spaces are rooted at ``gallery.model``,
  without an embedding layer when the gallery model has none);
* :func:`gallery_costs`: the params and MFLOPs the study records for its gallery model;
* :func:`profile_candidates`: what ``nas profile`` measures, and what it assumed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import timm
import torch
from torch import nn

from nas.config import ExperimentConfig, GalleryConfig
from nas.errors import ConfigError
from nas.gallery import pooled_width
from nas.hardware import Budget, check_budgets
from search_spaces import Architecture, SearchSpace, create_space, timm_architecture

__all__ = ["gallery_width", "gallery_architecture", "space_options", "study_space", "gallery_costs", "profile_candidates"]

#: ``nas profile``'s defaults without an experiment file.
DEFAULT_IN_CHANS, DEFAULT_EMBED_DIM, DEFAULT_TIMM_RESOLUTION = 1, 128, 32


def gallery_width(config: GalleryConfig, in_chans: int) -> int:
    """``gallery.embed_dim``, or (null) the width of ``gallery.model``'s pooled features, read without weights."""
    if config.embed_dim:
        return config.embed_dim
    if not timm.is_model(config.model):
        raise ConfigError(f"gallery.model {config.model!r} is not a timm architecture. See timm.list_models().")
    with torch.device("meta"):
        backbone = timm.create_model(config.model, pretrained=False, num_classes=0, in_chans=in_chans)
    return pooled_width(backbone)


def gallery_architecture(config: ExperimentConfig, resolution: int | None = None) -> Architecture:
    """The gallery model as the study embeds it (see the module docstring), at ``resolution`` or ``gallery.resolution``."""
    in_chans, g = config.data.resolved_channels, config.gallery
    arch = timm_architecture(g.model, resolution or g.resolution, gallery_width(g, in_chans), in_chans)
    return dataclasses.replace(arch, projection=g.embed_dim is not None)


def space_options(config: ExperimentConfig, name: str, gallery_sha: str = "") -> dict[str, Any]:
    """The options the study gives space ``name``: ``space.options`` when the file names that space; the
    ``gallery`` and ``pruned`` spaces prune ``gallery.model`` and, when the gallery embeds its pooled features
    (``gallery.embed_dim`` null), keep them as the embedding (no embedding layer)."""
    options = dict(config.space.options) if config.space.name == name else {}
    if name == "pruned" and gallery_sha:  # members name the weights that ranked their channels
        options.setdefault("root_sha", gallery_sha)
    if name in ("gallery", "pruned"):
        options.setdefault("model", config.gallery.model)
        options.setdefault("identity_head", config.gallery.embed_dim is None)
    return options


def study_space(config: ExperimentConfig, embed_dim: int | None = None, gallery_sha: str = "", **extra: Any) -> SearchSpace:
    """``space.name`` as the study creates it: :func:`space_options` (``extra`` added), embedding size
    ``embed_dim`` (default :func:`gallery_width`) and the data's channels. A bad option is a ``ConfigError``."""
    in_chans = config.data.resolved_channels
    options = {**space_options(config, config.space.name, gallery_sha), **extra}
    try:
        return create_space(config.space.name, embed_dim=embed_dim or gallery_width(config.gallery, in_chans), in_chans=in_chans, **options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def gallery_costs(gallery: nn.Module, resolution: int, in_chans: int, budgets: Sequence[Budget]) -> dict[str, float]:
    """What the study records of its gallery model: the budgets that need no runtime (params, MFLOPs), measured on it."""
    cheap = [b for b in budgets if b.name in ("params_m", "mflops")]
    return check_budgets(gallery, resolution, in_chans, cheap, measure_all=True).values


def _head(embed_dim: int, projection: bool = True) -> str:
    if projection:
        return f"a {embed_dim}-d embedding projection"
    return f"no embedding layer (the {embed_dim}-d pooled features, L2-normalised)"


def random_members(space: SearchSpace, n: int, seed: int) -> list[Architecture]:
    """``n`` architectures of ``space`` drawn by Optuna's random sampler (seeded)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    archs = []
    for _ in range(n):
        trial = study.ask()
        archs.append(space.sample(trial))
        study.tell(trial, 0.0)
    return archs


def profile_candidates(
    *,
    arch: str | None = None,
    timm_name: str | None = None,
    space: str | None = None,
    sample: int = 5,
    seed: int = 0,
    resolution: int | None = None,
    embed_dim: int | None = None,
    in_chans: int | None = None,
    config: ExperimentConfig | None = None,
    config_name: str = "",
) -> tuple[list[Architecture], str]:
    """The architectures ``nas profile`` measures, and one line saying where their shape came from.

    ``embed_dim`` 0 means no embedding layer (``timm_name`` only: its pooled features are the
    embedding). With ``config``: input channels from ``data``, embedding size from ``gallery``
    (:func:`gallery_width`), space options as the study gives them; ``timm_name`` naming
    ``gallery.model`` (and no ``embed_dim``) is the gallery model as the study embeds it
    (:func:`gallery_architecture`, at ``gallery.resolution``). Without ``config``, what no flag
    gives is assumed: 1 input channel, a 128-d projection, 32 px; the line says so.
    """
    if arch is not None:
        text = Path(arch).read_text() if arch.endswith(".json") else arch
        found = Architecture.from_json(text) if arch.endswith(".json") else Architecture.from_string(text)
        return [dataclasses.replace(found, resolution=resolution) if resolution else found], ""
    here = f"from {config_name}"
    if config is not None and timm_name == config.gallery.model and embed_dim is None:
        found = gallery_architecture(config, resolution)
        if in_chans not in (None, found.in_chans):
            found = dataclasses.replace(found, in_chans=in_chans)
        parts = [
            f"{_plural(found.in_chans, 'input channel')} ({'--in-chans' if in_chans else 'the data'})",
            f"{_head(found.embed_dim, found.projection)} (gallery.embed_dim {config.gallery.embed_dim or 'null'})",
            f"{found.resolution} px ({'--resolution' if resolution else 'gallery.resolution'})",
        ]
        return [found], f"Profiled as the study embeds its gallery model ({config_name}): {', '.join(parts)}."
    assumed = "assumed: no --config"
    if in_chans:
        chans, chans_from = in_chans, "--in-chans"
    else:
        chans, chans_from = (config.data.resolved_channels, here) if config is not None else (DEFAULT_IN_CHANS, assumed)
    if embed_dim is not None:
        dim, dim_from = embed_dim, "--embed-dim"
    else:
        dim, dim_from = (gallery_width(config.gallery, chans), f"the gallery model's embedding, {here}") if config is not None else (DEFAULT_EMBED_DIM, assumed)
    parts = [f"{_plural(chans, 'input channel')} ({chans_from})"]
    if timm_name is not None:
        found = timm_architecture(timm_name, resolution or DEFAULT_TIMM_RESOLUTION, dim or _pooled_features(timm_name, chans), chans)
        archs = [dataclasses.replace(found, projection=bool(dim))]  # 0: no embedding layer, the pooled features are the embedding
        parts += [f"{_head(found.embed_dim, bool(dim))} ({dim_from})", f"{found.resolution} px ({'--resolution' if resolution else 'assumed'})"]
    else:
        if not dim:
            raise ConfigError("--embed-dim 0 (no embedding layer) applies to --timm only; a space's members project to an embedding of --embed-dim.")
        options = space_options(config, space) if config is not None else {}
        try:
            members = create_space(space, embed_dim=dim, in_chans=chans, **options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
        archs = random_members(members, sample, seed)
        parts.append(f"{_head(dim)} ({dim_from})")
    hint = "; --config CONFIG takes them from an experiment" if config is None and any("assumed" in p for p in parts) else ""
    return archs, f"Profiled with {', '.join(parts)}{hint}."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pooled_features(name: str, in_chans: int) -> int:
    """The width of timm model ``name``'s pooled features (read without weights)."""
    if not timm.is_model(name):
        raise ConfigError(f"timm has no model named {name!r}; `timm.list_models()` lists the names it knows.")
    with torch.device("meta"):
        return pooled_width(timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans))
