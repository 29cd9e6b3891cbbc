"""Checks every config value against the type its dataclass field declares.

JSON and Python both blur types a training run must not blur: ``bool`` is an ``int`` subclass,
``"false"`` is a truthy string, ``"4"`` compares badly with ints only once deep inside the engine.
So each value is checked against its field's annotation before any range check runs, and a
mismatch is a :class:`~moetion.errors.ConfigError` naming the key, the value and the type expected.
Only the annotations the config uses are understood (``int``, ``float``, ``str``, ``bool``, their
``| None`` forms, and nested config dataclasses); any other annotation is a programming error.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from moetion.errors import ConfigError

_SCALARS = (bool, int, float, str)
_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def check_field_types(instance: Any, *, prefix: str) -> None:
    """Raises ConfigError for the first field of ``instance`` whose value does not match its annotation.

    ``prefix`` is the section's dotted path (``"snapshot."``), so the message names the full key.
    Nested config dataclasses are checked by their own ``__post_init__``.
    """
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        expected, optional = _scalar_of(hints[field.name])
        if expected is None:  # a nested section: it checked itself when it was built
            if not isinstance(value, hints[field.name]):
                raise ConfigError(
                    f"config key {prefix}{field.name} must be a mapping of its section's keys, got {value!r}")
            continue
        if value is None and optional:
            continue
        if not _matches(value, expected):
            null = " or null" if optional else ""
            raise ConfigError(
                f"config key {prefix}{field.name} must be {_NAMES[expected]}{null}, got {value!r} "
                f"({_json_type(value)})")


def _matches(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str)


def _scalar_of(hint: Any) -> tuple[type | None, bool]:
    """(the scalar type, whether None is allowed); (None, False) for a nested config dataclass."""
    if dataclasses.is_dataclass(hint):
        return None, False
    if hint in _SCALARS:
        return hint, False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS and len(typing.get_args(hint)) == 2:
            return args[0], True
    raise TypeError(f"config annotation {hint!r} is not one check_field_types understands")


def _json_type(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    return {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)
