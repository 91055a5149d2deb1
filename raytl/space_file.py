"""Reading a space file: YAML, ``--set`` overrides, the sections, then the checks that span them.

Kept apart from :mod:`raytl.config` (the types every process unpickles) because the checks ask
timm about the backbones (:mod:`raytl.config_checks`): the driver reads the file, and the
processes that only receive a :class:`~raytl.config.SpaceConfig` (a trial's Tune process among
them) do not import timm for it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from raytl.config import NAME, SECTIONS, SpaceConfig
from raytl.config_checks import check_space
from raytl.errors import ConfigError
from raytl.schema import apply_overrides, build_dataclass, reject_unknown
from raytl.space import HYPERPARAMETER_NAMES, parse_params


def load_space(
    path: str | Path, overrides: list[str] | None = None, *, local_paths: bool = True
) -> SpaceConfig:
    """Read, override (``--set key=value``) and validate a space file.

    ``local_paths=False`` skips the checks that data and checkpoint paths exist here (``raytl
    submit``: they are paths on the cluster).
    """
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(source, "<file>", "no such file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise ConfigError(
            source, where, f"not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "<top level>", f"expected a mapping, got {type(raw).__name__}")
    apply_overrides(raw, overrides or [], source, bare={n: "space" for n in HYPERPARAMETER_NAMES})
    return parse_space(raw, source, local_paths=local_paths)


def _mapping(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(source, key, f"expected a mapping, got {type(value).__name__}")
    return value


def parse_space(
    raw: dict[str, Any], source: str = "<memory>", *, local_paths: bool = True
) -> SpaceConfig:
    """Validate a space file's mapping; every problem raises a :class:`ConfigError`."""
    reject_unknown(raw, ["name", "cache", "space", *SECTIONS], source, "")
    name = raw.get("name", Path(source).stem if source != "<memory>" else "raytl")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(
            source,
            "name",
            f"expected letters, digits, '.', '_' or '-' (it names folders), got {name!r}",
        )
    sections: dict[str, Any] = {
        key: build_dataclass(cls, _mapping(raw, key, source), source, key)
        for key, cls in SECTIONS.items()
    }
    cache = raw.get("cache", True)
    if isinstance(cache, str) and cache.lower() in (
        "on",
        "off",
    ):  # YAML 1.2 readers keep them strings
        cache = cache.lower() == "on"
    if not isinstance(cache, bool):
        raise ConfigError(source, "cache", f"expected on or off, got {cache!r}")
    space = parse_params(_mapping(raw, "space", source), source)
    config = SpaceConfig(name=name, space=space, source=source, cache=cache, **sections)
    return dataclasses.replace(config, blocks=check_space(config, local_paths))
