"""Whether timm's pretrained weights of a model can be had now: from the local cache, or from a host that answers.

Without a network, timm's download retries for a minute or more before it fails.
:func:`check_pretrained` answers in seconds instead: the weights are in the Hugging Face
(or torch hub) cache, or their host accepts a connection, or a :class:`GalleryError` says
what to do. :func:`pretrained_download` wraps timm's download so that weights found in the
cache are read from it without asking an unreachable host first.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg

from nas.errors import GalleryError

__all__ = ["check_pretrained", "pretrained_download", "CONNECT_TIMEOUT"]

#: Seconds to wait for the weights' host to accept a connection.
CONNECT_TIMEOUT = 5.0

#: Files timm reads from a Hugging Face model repository, in the order it tries them.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")


def _hub_cache() -> str:
    """The Hugging Face cache folder as ``huggingface_hub`` resolves it (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return hub_constants.HF_HUB_CACHE


def _source(model: str) -> tuple[str | None, str | None]:
    """The cached weights file of ``model`` (None: not cached) and the URL they would be downloaded from."""
    cfg = get_pretrained_cfg(model)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise GalleryError(
            f"timm has no pretrained weights for {model!r}. Pick a model that has (timm.list_models(pretrained=True)), "
            f"or set gallery.weights to a weights file (and gallery.pretrained to false)."
        )
    if cfg.file:
        return (cfg.file if Path(cfg.file).is_file() else None), None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for name in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES):
            found = try_to_load_from_cache(repo, name, cache_dir=_hub_cache(), revision=revision or None)
            if isinstance(found, str):
                return found, None
        endpoint = os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT
        return None, f"{endpoint.rstrip('/')}/{repo}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(cfg.url).path)
    return (str(cached) if cached.is_file() else None), cfg.url


def _offline() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _reachable(url: str) -> str | None:
    """None when the host of ``url`` accepts a connection within :data:`CONNECT_TIMEOUT` seconds, else why not."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def check_pretrained(model: str) -> bool:
    """Whether timm's pretrained weights of ``model`` are cached (True) or can be downloaded now (False).

    Otherwise (offline mode, or their host does not answer) a :class:`GalleryError` says so at once.
    """
    cached, url = _source(model)
    if cached is not None:
        return True
    fix = ("Connect this machine, or download the weights elsewhere and set gallery.weights to the file "
           "(and gallery.pretrained to false), or copy the Hugging Face cache here.")
    if _offline():
        raise GalleryError(f"timm's pretrained weights for {model!r} are not in the cache ({_hub_cache()}) and HF_HUB_OFFLINE is set. {fix}")
    why = _reachable(url or "")
    if why is not None:
        host = urlsplit(url or "").hostname
        raise GalleryError(f"timm's pretrained weights for {model!r} are not in the cache ({_hub_cache()}) and {host} does not answer ({why}). {fix}")
    return False


@contextlib.contextmanager
def pretrained_download(model: str) -> Iterator[None]:
    """Around ``timm.create_model(model, pretrained=True)``: fails at once when the weights cannot be had
    (:func:`check_pretrained`); weights found in the cache are read without asking the network."""
    cached = check_pretrained(model)
    previous = hub_constants.HF_HUB_OFFLINE
    if cached:
        hub_constants.HF_HUB_OFFLINE = True  # huggingface_hub reads it on every request: the cached file, no retries
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous
