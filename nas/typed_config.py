"""Typed, frozen dataclasses built from plain mappings (a parsed YAML file).

:func:`build_dataclass` fills a dataclass from a mapping: a key the class does not have
is a :class:`~nas.errors.ConfigError` naming the nearest valid key, each value is
converted by its field's annotation (``int``, ``float``, ``bool``, ``str``, a mapping, a
nested dataclass, a list, ``X | None``), and the class's own ``__post_init__`` checks the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from nas.errors import ConfigError

__all__ = ["build_dataclass", "set_dotted", "check_config"]


def check_config(condition: bool, message: str) -> None:
    """A :class:`~nas.errors.ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def _unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"Unknown key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}.")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, but got {value!r}.")
        return build_dataclass(tp, value, where + ".")
    if tp is Any:  # validated by the dataclass itself
        return value
    if value is None:
        raise ConfigError(f"'{where}' must not be null.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, but got {value!r}.")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, but got {value!r}.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, but got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{where}' must be an integer, but got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, but got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, but got {value!r}.")
        return value
    return value


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from ``data``; ``prefix`` is the dotted path of ``data`` in the file (for messages)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(str(key), names, prefix)
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted`` = ``a.b.c``, creating missing or null sections."""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:  # a missing or empty (null) section
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"Cannot apply the override {dotted!r}: '{part}' is {child!r}, not a mapping.")
        node = child
    node[parts[-1]] = value
