"""Checks of a search request that need no data: made before the gallery is embedded (which can take many minutes).

:func:`check_search_request` is what ``nas search`` checks of its experiment before any
work; :func:`warm_start_entry` parses one entry of a ``search.warm_start`` list, both here
and when the search enqueues it.
"""

from __future__ import annotations

from nas.config import ExperimentConfig
from nas.errors import ConfigError
from nas.pretrained import check_pretrained
from nas.secrets import mask_url
from search_spaces import Architecture, timm_architecture, timm_model_exists

__all__ = ["check_search_request", "check_before_data", "check_warm_start", "warm_start_entry"]


def warm_start_entry(entry: str, embed_dim: int, in_chans: int) -> Architecture:
    """The architecture of one ``search.warm_start`` entry: ``timm_model@resolution`` or an architecture string.

    A malformed entry or a timm name timm does not know is a :class:`ConfigError`; nothing is built.
    """
    try:
        if "space=" in entry:
            arch = Architecture.from_string(entry)
        else:
            name, sep, res = entry.partition("@")
            if not sep or not res.isdigit() or int(res) < 1:
                raise ValueError(f"expected 'timm_model@resolution' (e.g. lcnet_050@32) or an architecture string, but got {entry!r}")
            arch = timm_architecture(name, int(res), embed_dim, in_chans)
    except ValueError as exc:
        raise ConfigError(f"search.warm_start: {exc}") from None
    if arch.timm_model and not timm_model_exists(arch.timm_model):
        raise ConfigError(
            f"search.warm_start: {entry!r} names timm model {arch.timm_model!r}, which timm does not know; "
            f"`timm.list_models('{arch.timm_model.split('_')[0]}*')` lists the names it knows."
        )
    return arch


def check_warm_start(config: ExperimentConfig) -> None:
    """Every entry of a ``search.warm_start`` list parses and names a known timm model, with the data's channels."""
    if not isinstance(config.search.warm_start, (list, tuple)):
        return  # null, 'baselines' and 'largest' are checked by SearchConfig
    channels = config.data.resolved_channels
    for entry in config.search.warm_start:
        arch = warm_start_entry(entry, config.gallery.embed_dim or 1, channels)
        if arch.in_chans != channels:
            raise ConfigError(f"search.warm_start: {entry!r} takes in={arch.in_chans} channel(s), but the data has {channels}.")


def check_before_data(config: ExperimentConfig) -> None:
    """What a search checks before the data: the warm start, and that timm's pretrained weights can be had."""
    check_warm_start(config)
    if config.gallery.source == "pretrained":
        check_pretrained(config.gallery.model)  # offline and not cached: at once, not after a minute of retries


def check_search_request(config: ExperimentConfig) -> None:
    """What ``nas search`` refuses before any work: no trial to add, a bad warm start."""
    if config.search.trials < 1:
        where = f"--storage {mask_url(config.search.storage)}" if config.search.storage else f"--run-dir {config.out_dir}"
        raise ConfigError(
            f"nas search adds search.trials trials to the study, but got {config.search.trials} (--trials or search.trials): "
            f"nothing would run. Pass --trials N with N >= 1; to see the study as it is, run "
            f"nas results --study-name {config.search.study_name} {where}."
        )
    check_warm_start(config)
