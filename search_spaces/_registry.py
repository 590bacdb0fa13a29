"""A decorator registry of search spaces, in the manner of timm's ``register_model``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from search_spaces._base import SearchSpace

__all__ = ["register_space", "create_space", "list_spaces", "space_options"]

_SPACES: dict[str, type[SearchSpace]] = {}


def register_space(name: str) -> Callable[[type[SearchSpace]], type[SearchSpace]]:
    """Class decorator: make a :class:`SearchSpace` subclass available as ``name``."""

    def decorator(cls: type[SearchSpace]) -> type[SearchSpace]:
        if name in _SPACES and _SPACES[name] is not cls:
            raise ValueError(f"A search space named {name!r} is already registered.")
        cls.name = name
        _SPACES[name] = cls
        return cls

    return decorator


def list_spaces() -> list[str]:
    """Names of the registered search spaces, sorted."""
    return sorted(_SPACES)


def space_options(name: str) -> list[str]:
    """The user-settable options of space ``name`` (its constructor's keyword arguments)."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "embed_dim", "in_chans")]


def _lookup(name: str) -> type[SearchSpace]:
    if name not in _SPACES:
        close = difflib.get_close_matches(name, list(_SPACES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown search space {name!r}.{hint} Valid spaces: {', '.join(list_spaces())}.")
    return _SPACES[name]


def create_space(name: str, embed_dim: int, in_chans: int, **options: Any) -> SearchSpace:
    """Instantiate space ``name``; an unknown option is a ``ValueError`` naming it and the valid ones."""
    cls = _lookup(name)
    valid = space_options(name)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown option {key!r} for search space {name!r}.{hint} Valid options: {', '.join(valid)}.")
    return cls(embed_dim=embed_dim, in_chans=in_chans, **options)
