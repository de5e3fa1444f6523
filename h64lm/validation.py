"""The one validation idiom of every config schema.

A schema field declares its allowed values where it is defined:

    max_steps: int = bounded(300, ge=1)
    lr: float = bounded(3e-3, gt=0)
    schedule: str = bounded("cosine", choices=SCHEDULES)

and the schema's `__post_init__` calls `validate_fields(self)`, which checks every field (floats must be
finite, every integer field must declare its range), then states the rules that tie fields together
with `check(ok, message)`. Every failure is one `ConfigError` line that names the full key
(`train.max_steps=0 must be >= 1`) so the user knows which option to change.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Sequence

__all__ = ["ConfigError", "check", "check_patterns", "bounded", "validate_fields", "describe_bounds"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key to change."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: tuple | None = None, null: str | None = None) -> Any:
    """A dataclass field with its allowed values. `null` says what None means when it is allowed."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, null=null).items()
            if v is not None}
    return dataclasses.field(default=default, metadata=meta)


def describe_bounds(meta: dict) -> str:
    """'>= 1', '>= 0 and < 1', 'one of a, b', each with what null means when null is allowed."""
    if "choices" in meta:
        text = "one of " + ", ".join(map(str, meta["choices"]))
    else:
        ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        text = " and ".join(f"{op} {meta[k]}" for k, op in ops if k in meta)
    return text + (f", or null ({meta['null']})" if "null" in meta else "")


def _in_bounds(value: Any, meta: dict) -> bool:
    if "choices" in meta:
        return value in meta["choices"]
    return not (("ge" in meta and value < meta["ge"]) or ("gt" in meta and value <= meta["gt"])
                or ("le" in meta and value > meta["le"]) or ("lt" in meta and value >= meta["lt"]))


def _base_type(hint: Any) -> Any:
    """int for Optional[int] / int | None; the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else hint


def validate_fields(obj: Any) -> None:
    """Check every field of a schema dataclass against its type and declared bounds.

    The class names its config group in a `config_group` ClassVar, used as the key prefix in messages.
    """
    group = type(obj).config_group
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, meta, key = getattr(obj, f.name), f.metadata, f"{group}.{f.name}".lstrip(".")
        if value is None:
            check(_base_type(hints[f.name]) is not hints[f.name] or hints[f.name] is Any,
                  f"{key}=null is not allowed; set a value")
            continue
        kind = _base_type(hints[f.name])
        if kind is float:
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                  f"{key}={value!r} must be a finite number")
        if kind is bool:
            check(isinstance(value, bool), f"{key}={value!r} must be true or false")
        if kind is int:
            check(isinstance(value, int) and not isinstance(value, bool), f"{key}={value!r} must be an integer")
        if meta.keys() - {"null"}:
            check(_in_bounds(value, meta), f"{key}={value!r} must be {describe_bounds(meta)}")


def check_patterns(patterns: Sequence[str], key: str) -> None:
    """One line for a list entry that is not a regular expression (e.g. `train.freeze`)."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"{key}: {p!r} is not a regular expression ({e}); e.g. {key}=[router]") from e
