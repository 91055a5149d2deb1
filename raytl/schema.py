"""Typed values from YAML: check a value against a type hint, reject unknown keys, build a dataclass.

The space file's sections and its hyperparameters are frozen dataclasses; this module turns a
YAML mapping into one, and every problem into a :class:`~raytl.errors.ConfigError` that names the
file, the key and what was expected. A dataclass checks its own ranges in ``__post_init__`` by
raising :class:`InvalidValue`; :func:`build_dataclass` names the file and section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml

from raytl.errors import ConfigError


class InvalidValue(ValueError):
    """A dataclass field out of range: ``key`` is the field, the message says what was expected."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def require(ok: bool, key: str, message: str) -> None:
    """Raise :class:`InvalidValue` unless ``ok`` (for ``__post_init__`` checks)."""
    if not ok:
        raise InvalidValue(key, message)


@dataclass(frozen=True)
class OneOf:
    """``Annotated[str, OneOf(names)]``: a string from a registry (strategies, schemes, sources),
    so the names live in one place and type checkers still see ``str``."""

    names: tuple[str, ...]


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def base_type(hint: Any) -> Any:
    """``int`` for ``int | None``; ``str`` for ``Annotated[str, ...]``."""
    if typing.get_origin(hint) is Annotated:
        return typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (
        base_type(args[0])
        if args and typing.get_origin(hint) in (typing.Union, types.UnionType)
        else hint
    )


def reject_unknown(values: dict[str, Any], known: list[str], source: str, prefix: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                source, where, f"unknown key{hint}; expected one of {', '.join(known)}"
            )


def _expect_one_of(value: Any, allowed: tuple[Any, ...], source: str, key: str) -> Any:
    if value not in allowed:
        raise ConfigError(
            source, key, f"expected one of {', '.join(map(str, allowed))}, got {value!r}"
        )
    return value


def coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """Check (and gently convert) ``value`` against a type hint: int, float, str, bool, Literal,
    Optional, or a registry name (``OneOf``)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        value = coerce(value, base, source, key)
        for extra in extras:
            if isinstance(extra, OneOf):
                _expect_one_of(value, extra.names, source, key)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return coerce(value, next(a for a in args if a is not type(None)), source, key)
    if origin is Literal:
        return _expect_one_of(value, typing.get_args(hint), source, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        return {
            k: coerce(v, typing.get_args(hint)[1], source, f"{key}.{k}") for k, v in value.items()
        }
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type hint {hint!r} for {key}")  # a bug in raytl, not user input


T = typing.TypeVar("T")


def build_dataclass(cls: type[T], values: dict[str, Any], source: str, prefix: str) -> T:
    """Build ``cls`` from a mapping: unknown keys, wrong types and out-of-range values are errors
    naming the key."""
    field_hints = hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]  # cls is a dataclass
    reject_unknown(values, names, source, prefix)
    kwargs = {k: coerce(v, field_hints[k], source, f"{prefix}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except InvalidValue as exc:
        raise ConfigError(
            source, f"{prefix}.{exc.key}" if prefix else exc.key, exc.message
        ) from None


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], source: str, bare: Mapping[str, str]
) -> None:
    """Apply ``key=value`` overrides (``--set``) to a YAML mapping in place; each value is read as
    YAML. A bare name listed in ``bare`` lives in that section (``strategy`` -> ``space.strategy``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(source, f"--set {item}", "expected key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in bare:
            parts = [bare[parts[0]], parts[0]]
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(source, f"--set {key}", f"{part!r} is not a section")
            node = child
        node[parts[-1]] = value
