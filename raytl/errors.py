"""User-facing errors: one clear line each, printed by the CLI without a traceback."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), for one-line errors
    that quote what a library said."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class RaytlError(Exception):
    """An error caused by the user's input (a file, a key, a value), not by a bug in raytl."""


class ConfigError(RaytlError, ValueError):
    """The search-space file (or a --set override) is wrong: names the file, the key and what was expected."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {key}: {message}")
