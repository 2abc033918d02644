"""One value of a study file against its key: the type it must have and the bounds it must keep."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

# A key's field (its default, and its bounds in ``metadata``) and type hint; ``Any`` leaves a value unchecked.
Key = tuple[dataclasses.Field, Any]


def check_value(f: dataclasses.Field, hint: Any, key: str, value: Any) -> tuple[Any, str | None]:
    """Coerce ``value`` to the field's type; return (value, problem or None)."""
    if f.metadata.get("size"):
        count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if not (count or isinstance(value, float) and 0 < value < 1):
            return value, f"{key}: must be a count >= 1 or a fraction in (0, 1), got {value!r}"
        return value, None
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            return value, f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}"
        return value, None
    if hint is bool:
        if not isinstance(value, bool):
            return value, f"{key}: must be true or false, got {value!r}"
        return value, None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"{key}: must be an integer, got {value!r}"
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{key}: must be a number, got {value!r}"
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            return value, f"{key}: must be a finite number, got {value!r}"
    elif hint is str and not isinstance(value, str):
        return value, f"{key}: must be a string, got {value!r}"
    lo, hi, lo_open = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        return value, f"{key}: must be {bound}, got {value!r}"
    if hi is not None and value > hi:
        return value, f"{key}: must be <= {hi}, got {value!r}"
    return value, None


def section_keys(cls: type) -> dict[str, Key]:
    """A section dataclass's keys: each field and its type hint."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}
