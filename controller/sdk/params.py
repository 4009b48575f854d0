"""Parameters: what `task.connect()` stores, and how overridden values come back typed.

Decisions:

- A connected dict (or object) becomes one hyperparameter section, one entry per key or
  attribute. Nested dicts stay one value of type dict (they are not flattened).
- Values are stored as JSON values (str, int, float, bool, None, list, dict); tuples are
  stored as lists, anything else (Path, Enum, ...) as its `str()`.
- Overrides usually arrive as strings (from the CLI, a pipeline's `parameter_override`,
  a web form). `cast_like` turns a stored value back into the type of the code's default:
  int ("7", 7.0), float ("0.5"), bool ("true"/"false", "yes"/"no", "1"/"0", "on"/"off"),
  str, list/tuple and dict (JSON or Python literal text), None ("None"/"null" → None,
  anything else kept as given). A stored null stays None whatever the default. A value
  that cannot be cast raises ValueError naming the parameter, its value and the default.
"""

from __future__ import annotations

import ast
import enum
import inspect
import json
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

DEFAULT_SECTION = "General"
_TRUE = frozenset({"true", "yes", "y", "t", "1", "on"})
_FALSE = frozenset({"false", "no", "n", "f", "0", "off", ""})
_NONE = frozenset({"none", "null"})


def to_stored(value: Any) -> Any:
    """`value` as a JSON value the store keeps."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return to_stored(value.value)
    if isinstance(value, list | tuple | set | frozenset):
        return [to_stored(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_stored(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _parse_literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)


def cast_like(value: Any, default: Any, where: str = "parameter") -> Any:
    """`value` (as stored) converted to the type of `default` (see the module docstring)."""
    if value is None:
        return None
    kind = type(default)

    def refuse(reason: str = "") -> ValueError:
        extra = f": {reason}" if reason else ""
        return ValueError(
            f"{where}: cannot use {value!r} as {kind.__name__} (the type of its default "
            f"{default!r}){extra}"
        )

    if default is None:
        if isinstance(value, str) and value.strip().lower() in _NONE:
            return None
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        raise refuse("use true/false")
    if isinstance(default, int) and not isinstance(default, enum.Enum):
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        try:
            number = float(value) if not isinstance(value, str) else _to_number(value)
        except (TypeError, ValueError):
            raise refuse() from None
        if isinstance(number, int):
            return number
        if float(number).is_integer():
            return int(number)
        raise refuse("not a whole number")
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise refuse() from None
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        return json.dumps(value) if isinstance(value, list | dict) else str(value)
    if isinstance(default, list | tuple | dict):
        parsed = value
        if isinstance(value, str):
            try:
                parsed = _parse_literal(value)
            except (ValueError, SyntaxError):
                raise refuse("give JSON or a Python literal") from None
        wanted = dict if isinstance(default, dict) else (list, tuple)
        if not isinstance(parsed, wanted):
            raise refuse()
        return kind(parsed) if kind in (list, tuple, dict) else parsed
    try:
        return kind(value)
    except Exception:  # noqa: BLE001 - unknown types: keep the value as stored
        return value


def _to_number(text: str) -> int | float:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


# ------------------------------------------------------- dicts, objects, classes
def _is_parameter(name: str, value: Any) -> bool:
    if name.startswith("_"):
        return False
    if isinstance(value, staticmethod | classmethod | property):
        return False
    return not (callable(value) or inspect.ismodule(value))


def read_values(target: Any) -> dict[str, Any]:
    """The parameters of a dict, an object (argparse.Namespace...) or a class."""
    if isinstance(target, Mapping):
        return {str(k): v for k, v in target.items()}
    if inspect.isclass(target):
        return {k: v for k, v in vars(target).items() if _is_parameter(k, v)}
    if hasattr(target, "__dict__"):
        return {k: v for k, v in vars(target).items() if _is_parameter(k, v)}
    raise TypeError(
        f"cannot connect an object of type {type(target).__name__}: give a dict, an "
        "argparse.Namespace, an object with attributes, or a class"
    )


def write_values(target: Any, values: Mapping[str, Any]) -> None:
    """Put `values` back into the dict, object or class they were read from."""
    if isinstance(target, MutableMapping):
        keys = {str(k): k for k in target}
        for name, value in values.items():
            target[keys.get(name, name)] = value
        return
    for name, value in values.items():
        setattr(target, name, value)


def merge_connected(
    defaults: Mapping[str, Any], stored: Mapping[str, Any], section: str, *, prefer_stored: bool
) -> dict[str, Any]:
    """The values a connected section takes.

    Under an agent (`prefer_stored`), a value stored on the task wins over the code's
    default and is cast to the default's type; keys only in the code keep their default.
    """
    if not prefer_stored:
        return dict(defaults)
    merged = dict(defaults)
    for name, default in defaults.items():
        if name in stored:
            merged[name] = cast_like(stored[name], default, f"parameter {section}/{name}")
    return merged


def split_key(key: str, default_section: str = DEFAULT_SECTION) -> tuple[str, str]:
    """"Section/name" → (section, name); a bare name is in `default_section`."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid parameter name {key!r}")
    section, sep, name = key.partition("/")
    if not sep:
        return default_section, key
    if not section or not name:
        raise ValueError(f"invalid parameter name {key!r}: use 'Section/name'")
    return section, name


def flatten(hyperparams: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{section: {name: v}} → {"section/name": v}."""
    return {f"{s}/{n}": v for s, params in hyperparams.items() for n, v in params.items()}


def nest(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"section/name": v} → {section: {name: v}} (values made storable)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, name = split_key(key)
        sections.setdefault(section, {})[name] = to_stored(value)
    return sections
