"""Named registries: every name a config file may give comes from one of these.

A registry maps names to entries (a class, a factory, a small record) for one config
key, in registration order. An unknown name is a :class:`~nas.errors.ConfigError` that
names the key, the valid names and the closest ones, so a typo in an experiment file is
one clear paragraph, never a ``KeyError``. Adding a sampler, runtime, dataset, export
format or evaluator is one ``@REGISTRY.register("name")`` entry where it is defined.

This module imports only the standard library and :mod:`nas.errors`: the config imports
the registries to check names when a file is loaded.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from nas.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name for the config key ``what`` (e.g. ``"search.sampler"``)."""

    def __init__(self, what: str) -> None:
        if not what:
            raise ValueError("A registry needs the config key it serves, but got ''.")
        self.what = what
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` as ``name``; a name already taken is a ``ValueError``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"A {self.what} entry needs a non-empty name, but got {name!r}.")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice.")
        self._entries[name] = entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; returns the entry unchanged."""

        def decorate(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorate

    def check(self, name: str) -> None:
        """Raise :class:`ConfigError` unless ``name`` is registered."""
        if name in self._entries:
            return
        close = difflib.get_close_matches(str(name), list(self._entries), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        valid = ", ".join(repr(n) for n in self._entries)
        raise ConfigError(f"{self.what} must be one of {valid}, but got {name!r}.{hint}")

    def get(self, name: str) -> T:
        """The entry named ``name`` (see :meth:`check` for an unknown one)."""
        self.check(name)
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
