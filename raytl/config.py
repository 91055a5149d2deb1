"""The search-space file: strict, typed loading with errors that name the file, the key and what was expected.

A space file has fixed sections (``data``, ``model``, ``scheme``, ``search``, ``resources``) and a
``space`` section whose entries are the trial's hyperparameters, each either a constant or a
distribution (``choice``, ``int``, ``uniform``, ``loguniform``), optionally conditional on another
choice through ``when``. Anything not in ``space`` takes its default from :class:`Hyperparameters`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raytl.errors import ConfigError

DATA_SOURCES = ("imagefolder", "parquet", "fashion-mnist", "digits", "synthetic")
STRATEGY_NAMES = ("linear_probe", "fine_tune", "lp_ft", "scratch")
DISTRIBUTIONS = ("choice", "int", "uniform", "loguniform")


@dataclass
class DataConfig:
    """Where the images come from and how they are split (the test split is carved once, first)."""

    source: Literal["imagefolder", "parquet", "fashion-mnist", "digits", "synthetic"] = "digits"
    path: str | None = None
    image_size: int = 64
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    limit: int | None = None
    seed: int = 0
    on_bad_file: Literal["skip", "error"] = "skip"
    max_pixels: int = 178_956_970
    download: bool = False
    synthetic_classes: int = 4
    synthetic_per_class: int = 60


@dataclass
class ModelConfig:
    """The timm backbone and where its weights come from: package | hub | none | a checkpoint path."""

    backbone: str = "efficientnet_lite0"
    pretrained: str = "package"
    compile: bool = False  # torch.compile the model for training and evaluation (GPU nodes)


@dataclass
class SchemeConfig:
    """How a trial is scored: one holdout split, k cross-validation folds, or S disjoint segments."""

    kind: Literal["holdout", "cv", "segments"] = "holdout"
    folds: int = 3
    segments: int = 3


@dataclass
class SearchConfig:
    """The Tune side: budget, sampler, early stopping, storage."""

    num_samples: int = 8
    max_concurrent: int = 2
    max_epochs: int = 4
    grace_period: int = 1
    reduction_factor: int = 2
    scheduler: Literal["asha", "fifo"] = "asha"
    sampler: Literal["tpe", "random"] = "tpe"
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    seed: int = 0
    storage: str | None = None
    max_failures: int = 2


@dataclass
class ResourcesConfig:
    """What one trial asks of the cluster: W Ray Train workers, each with these CPUs/GPUs."""

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class Hyperparameters:
    """One trial's full configuration; the ``space`` section samples or fixes these fields.

    ``freeze_depth`` counts the backbone's blocks in forward order, stem first (see
    :func:`raytl.models.backbone_blocks`): 0 freezes nothing, ``k`` freezes the first ``k``.
    """

    strategy: Literal["linear_probe", "fine_tune", "lp_ft", "scratch"] = "fine_tune"
    backbone: str | None = None  # None: the model section's backbone
    freeze_depth: int = 0
    head_lr: float = 3e-3
    backbone_lr: float = 3e-4
    layer_decay: float = 1.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    batch_size: int = 64
    epochs: int | None = None  # None: search.max_epochs
    lp_epochs: int | None = None  # lp_ft's probe phase; None: a third of the epochs (at least 1)
    augment: bool = False


HYPERPARAMETER_NAMES = tuple(f.name for f in dataclasses.fields(Hyperparameters))


@dataclass
class ParamSpec:
    """One entry of the ``space`` section: a constant or a distribution, maybe conditional."""

    name: str
    kind: Literal["const", "choice", "int", "uniform", "loguniform"]
    values: tuple[Any, ...] = ()  # const: (value,); choice: the options
    low: float = 0.0
    high: float = 0.0
    step: int = 1
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def is_active(self, sampled: dict[str, Any]) -> bool:
        """Whether every ``when`` condition holds for the values sampled so far."""
        return all(sampled.get(key) in allowed for key, allowed in self.when.items())


@dataclass
class SpaceConfig:
    """A validated space file."""

    name: str
    data: DataConfig
    model: ModelConfig
    scheme: SchemeConfig
    search: SearchConfig
    resources: ResourcesConfig
    space: dict[str, ParamSpec]
    source: str = "<memory>"
    raw: dict[str, Any] = field(default_factory=dict)
    cache: bool = True  # the frozen-feature cache (raytl.feature_cache); `cache: off` disables it

    def hyperparameters(self, sampled: dict[str, Any] | None = None) -> Hyperparameters:
        """The trial configuration for ``sampled`` values, constants and defaults filled in."""
        values: dict[str, Any] = {}
        for spec in self.space.values():
            if spec.kind == "const" and spec.is_active({**values, **(sampled or {})}):
                values[spec.name] = spec.values[0]
        values.update(sampled or {})
        hints = typing.get_type_hints(Hyperparameters)
        for name, value in values.items():  # tables hold ints as floats (3.0), numpy scalars, ...
            if hasattr(value, "item"):
                value = value.item()
            if _base_type(hints[name]) is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            values[name] = value
        hp = Hyperparameters(**values)
        if hp.backbone is None:
            hp.backbone = self.model.backbone
        if hp.epochs is None:
            hp.epochs = self.search.max_epochs
        return hp

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, in the file's own shape (written as DIR/space.yaml)."""
        out: dict[str, Any] = {"name": self.name, "cache": self.cache}
        for section in ("data", "model", "scheme", "search", "resources"):
            out[section] = dataclasses.asdict(getattr(self, section))
        out["space"] = {name: spec_to_yaml(spec) for name, spec in self.space.items()}
        return out


def spec_to_yaml(spec: ParamSpec) -> Any:
    """The YAML form of one space entry (the inverse of parsing)."""
    if spec.kind == "const":
        entry: Any = spec.values[0]
        if not spec.when:
            return entry
        entry = {"value": entry}
    elif spec.kind == "choice":
        entry = {"choice": list(spec.values)}
    elif spec.kind == "int":
        entry = {"int": [int(spec.low), int(spec.high)]}
        if spec.step != 1:
            entry["step"] = spec.step
    else:
        entry = {spec.kind: [spec.low, spec.high]}
    if spec.when:
        entry["when"] = {k: list(v) for k, v in spec.when.items()}
    return entry


# --------------------------------------------------------------------------- loading


def load_space(path: str | Path, overrides: list[str] | None = None, *,
               local_paths: bool = True) -> SpaceConfig:
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
        raise ConfigError(source, where, f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "<top level>", f"expected a mapping, got {type(raw).__name__}")
    apply_overrides(raw, overrides or [], source)
    return parse_space(raw, source, local_paths=local_paths)


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> None:
    """Apply ``key=value`` overrides in place; a bare hyperparameter name fixes ``space.NAME``."""
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
        if len(parts) == 1 and parts[0] in HYPERPARAMETER_NAMES:
            parts = ["space", parts[0]]
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(source, f"--set {key}", f"{part!r} is not a section")
            node = child
        node[parts[-1]] = value


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "scheme": SchemeConfig,
    "search": SearchConfig,
    "resources": ResourcesConfig,
}


def parse_space(raw: dict[str, Any], source: str = "<memory>", *,
                local_paths: bool = True) -> SpaceConfig:
    """Validate a space file's mapping; every problem raises a :class:`ConfigError`."""
    _reject_unknown(raw, ["name", "cache", "space", *_SECTIONS], source, "")
    name = raw.get("name", Path(source).stem if source != "<memory>" else "raytl")
    if not isinstance(name, str) or not name:
        raise ConfigError(source, "name", f"expected a non-empty string, got {name!r}")
    sections = {}
    for section, cls in _SECTIONS.items():
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(source, section, f"expected a mapping, got {type(value).__name__}")
        sections[section] = build_dataclass(cls, value, source, section)
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise ConfigError(source, "space", f"expected a mapping, got {type(space_raw).__name__}")
    cache = raw.get("cache", True)
    if isinstance(cache, str) and cache.lower() in ("on", "off"):  # YAML 1.2 readers keep them strings
        cache = cache.lower() == "on"
    if not isinstance(cache, bool):
        raise ConfigError(source, "cache", f"expected on or off, got {cache!r}")
    config = SpaceConfig(
        name=name, space=parse_params(space_raw, source), source=source, raw=raw, cache=cache,
        **sections,
    )
    _check_ranges(config, local_paths)
    return config


def build_dataclass(cls: type, values: dict[str, Any], source: str, prefix: str) -> Any:
    """Build ``cls`` from a mapping: unknown keys and wrong types are errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _reject_unknown(values, names, source, prefix)
    kwargs = {k: coerce(v, hints[k], source, f"{prefix}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _reject_unknown(values: dict[str, Any], known: list[str], source: str, prefix: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(source, where, f"unknown key{hint}; expected one of {', '.join(known)}")


def coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """Check (and gently convert) ``value`` against a type hint: int, float, str, bool, Literal, Optional."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return coerce(value, non_none[0], source, key)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                source, key, f"expected one of {', '.join(map(str, allowed))}, got {value!r}"
            )
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
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type hint {hint!r} for {key}")  # a bug in raytl, not user input


def parse_params(space_raw: dict[str, Any], source: str) -> dict[str, ParamSpec]:
    """Parse the ``space`` section into :class:`ParamSpec` entries, checking types against Hyperparameters."""
    hints = typing.get_type_hints(Hyperparameters)
    _reject_unknown(space_raw, list(HYPERPARAMETER_NAMES), source, "space")
    specs: dict[str, ParamSpec] = {}
    for name, entry in space_raw.items():
        key = f"space.{name}"
        hint = hints[name]
        if not isinstance(entry, dict):
            value = coerce(entry, hint, source, key)
            specs[name] = ParamSpec(name, "const", (value,))
            continue
        kinds = [k for k in entry if k in (*DISTRIBUTIONS, "value")]
        extra = [k for k in entry if k not in (*DISTRIBUTIONS, "value", "when", "step")]
        if len(kinds) != 1 or extra:
            raise ConfigError(
                source, key, "expected a constant or a mapping with exactly one of "
                f"choice, int, uniform, loguniform, value (plus optional when, step); got keys {sorted(entry)}"
            )
        kind = kinds[0]
        body = entry[kind]
        if kind == "value":
            spec = ParamSpec(name, "const", (coerce(body, hint, source, key),))
        elif kind == "choice":
            if not isinstance(body, list) or not body:
                raise ConfigError(source, f"{key}.choice", f"expected a non-empty list, got {body!r}")
            values = tuple(coerce(v, hint, source, f"{key}.choice") for v in body)
            spec = ParamSpec(name, "choice", values)
        else:
            if not isinstance(body, list) or len(body) != 2:
                raise ConfigError(source, f"{key}.{kind}", f"expected [low, high], got {body!r}")
            if kind == "int":
                low, high = (coerce(v, int, source, f"{key}.int") for v in body)
                if _base_type(hint) is not int:
                    raise ConfigError(source, f"{key}.int", f"{name} is not an integer hyperparameter")
            else:
                low, high = (coerce(v, float, source, f"{key}.{kind}") for v in body)
                if _base_type(hint) is not float:
                    raise ConfigError(source, f"{key}.{kind}", f"{name} is not a real-valued hyperparameter")
            if not low <= high:
                raise ConfigError(source, f"{key}.{kind}", f"low <= high must hold, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(source, f"{key}.loguniform", f"low must be > 0, got {low}")
            step = entry.get("step", 1)
            if kind != "int" and "step" in entry:
                raise ConfigError(source, f"{key}.step", "step applies to int ranges only")
            step = coerce(step, int, source, f"{key}.step")
            spec = ParamSpec(name, kind, low=low, high=high, step=step)
        spec.when = _parse_when(entry.get("when"), source, key)
        specs[name] = spec
    # conditions refer to choices or constants that exist, with values they can take
    for spec in specs.values():
        for cond, allowed in spec.when.items():
            target = specs.get(cond)
            if target is None or target.kind not in ("choice", "const"):
                raise ConfigError(
                    source, f"space.{spec.name}.when.{cond}",
                    "a condition must name a choice (or constant) in the space section",
                )
            for v in allowed:  # each value must at least be one the hyperparameter can take
                coerce(v, hints[cond], source, f"space.{spec.name}.when.{cond}")
            bad = [v for v in allowed if v not in target.values]
            if bad and target.kind == "choice":  # a constant (e.g. fixed by --set) may exclude them
                raise ConfigError(
                    source, f"space.{spec.name}.when.{cond}",
                    f"{bad} not among {cond}'s values {list(target.values)}",
                )
    _check_condition_order(specs, source)
    return specs


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse_when(when: Any, source: str, key: str) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise ConfigError(source, f"{key}.when", f"expected a mapping name: [values], got {when!r}")
    out = {}
    for cond, allowed in when.items():
        if not isinstance(allowed, list):
            allowed = [allowed]
        out[str(cond)] = tuple(allowed)
    return out


def _check_condition_order(specs: dict[str, ParamSpec], source: str) -> None:
    """Conditions must not form cycles (the define-by-run space samples parents first)."""
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            raise ConfigError(source, f"space.{name}.when", f"circular condition {' -> '.join(path)}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for parent in specs[name].when:
            visit(parent, [*path, parent])
        state[name] = 2

    for name in specs:
        visit(name, [name])


def condition_order(specs: dict[str, ParamSpec]) -> list[ParamSpec]:
    """The space's entries with every condition's target before the entries that depend on it."""
    ordered: list[ParamSpec] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        for parent in specs[name].when:
            visit(parent)
        seen.add(name)
        ordered.append(specs[name])

    for name in specs:
        visit(name)
    return ordered


def _check_ranges(config: SpaceConfig, local_paths: bool = True) -> None:
    """Values that must be positive or in (0, 1), the backbone's existence and freeze-depth bounds."""
    src = config.source
    d, s, sc, r = config.data, config.search, config.scheme, config.resources
    checks = [
        (d.image_size >= 8, "data.image_size", f"expected >= 8 pixels, got {d.image_size}"),
        (0 < d.test_fraction < 1, "data.test_fraction", f"expected in (0, 1), got {d.test_fraction}"),
        (0 < d.val_fraction < 1, "data.val_fraction", f"expected in (0, 1), got {d.val_fraction}"),
        (d.limit is None or d.limit >= 10, "data.limit", f"expected >= 10 images, got {d.limit}"),
        (d.max_pixels > 0, "data.max_pixels", f"expected > 0, got {d.max_pixels}"),
        (d.synthetic_classes >= 2, "data.synthetic_classes", f"expected >= 2, got {d.synthetic_classes}"),
        (d.synthetic_per_class >= 4, "data.synthetic_per_class", f"expected >= 4, got {d.synthetic_per_class}"),
        (sc.folds >= 2, "scheme.folds", f"expected >= 2, got {sc.folds}"),
        (sc.segments >= 1, "scheme.segments", f"expected >= 1, got {sc.segments}"),
        (s.num_samples >= 1, "search.num_samples", f"expected >= 1, got {s.num_samples}"),
        (s.max_concurrent >= 1, "search.max_concurrent", f"expected >= 1, got {s.max_concurrent}"),
        (s.max_epochs >= 1, "search.max_epochs", f"expected >= 1, got {s.max_epochs}"),
        (1 <= s.grace_period <= s.max_epochs, "search.grace_period",
         f"expected in [1, max_epochs={s.max_epochs}], got {s.grace_period}"),
        (s.reduction_factor >= 2, "search.reduction_factor", f"expected >= 2, got {s.reduction_factor}"),
        (s.max_failures >= 0, "search.max_failures", f"expected >= 0, got {s.max_failures}"),
        (r.workers_per_trial >= 1, "resources.workers_per_trial", f"expected >= 1, got {r.workers_per_trial}"),
        (r.cpus_per_worker > 0, "resources.cpus_per_worker", f"expected > 0, got {r.cpus_per_worker}"),
        (r.gpus_per_worker >= 0, "resources.gpus_per_worker", f"expected >= 0, got {r.gpus_per_worker}"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(src, key, message)
    if d.source in ("imagefolder", "parquet") and not d.path:
        raise ConfigError(src, "data.path", f"the {d.source} source needs a path")
    needs_path = d.source in ("imagefolder", "parquet") or (d.source == "fashion-mnist" and not d.download)
    if local_paths and d.path and needs_path and not Path(d.path).exists():
        raise ConfigError(src, "data.path", f"no such file or folder: {d.path}")
    _check_hyperparameters(config, local_paths)


def _values_of(spec: ParamSpec | None, default: Any) -> list[Any]:
    if spec is None:
        return [default]
    if spec.kind in ("const", "choice"):
        return list(spec.values)
    return [spec.low, spec.high]


def _check_hyperparameters(config: SpaceConfig, local_paths: bool = True) -> None:
    """Backbones exist in timm; freeze depth fits each backbone it can meet; numbers are sane."""
    from raytl.models import check_pretrained, count_blocks  # timm import is slow: only when needed

    src, space = config.source, config.space
    backbone_key = "space.backbone" if "backbone" in space else "model.backbone"
    backbones = _values_of(space.get("backbone"), config.model.backbone)
    depths = {}
    for backbone in backbones:
        depths[backbone] = count_blocks(backbone, src, backbone_key)
        check_pretrained(backbone, config.model.pretrained, src, check_path=local_paths)
    fd = space.get("freeze_depth")
    if fd is not None:
        low, high = (int(v) for v in (_values_of(fd, 0)[0], _values_of(fd, 0)[-1]))
        if fd.kind in ("const", "choice"):
            low, high = min(fd.values), max(fd.values)
        if low < 0:
            raise ConfigError(src, "space.freeze_depth", f"expected >= 0, got {low}")
        fixed_backbone = "backbone" not in space or space["backbone"].kind == "const"
        limit = min(depths.values()) if fixed_backbone else max(depths.values())
        if high > limit:
            names = ", ".join(f"{b}: {n}" for b, n in depths.items())
            raise ConfigError(
                src, "space.freeze_depth",
                f"{high} is beyond the backbone's block count ({names}); expected <= {limit}",
            )
    positive = ("head_lr", "backbone_lr", "batch_size", "epochs", "lp_epochs", "layer_decay")
    for name in positive:
        for v in _values_of(space.get(name), 1):
            if v is not None and v <= 0:
                raise ConfigError(src, f"space.{name}", f"expected > 0, got {v}")
    for name, hi in (("label_smoothing", 1.0), ("layer_decay", 1.0)):
        for v in _values_of(space.get(name), 0.0):
            if v > hi or v < 0:
                raise ConfigError(src, f"space.{name}", f"expected in [0, {hi}], got {v}")
    for v in _values_of(space.get("weight_decay"), 0.0):
        if v < 0:
            raise ConfigError(src, "space.weight_decay", f"expected >= 0, got {v}")
    max_epochs = config.search.max_epochs
    for v in _values_of(space.get("lp_epochs"), None):
        if v is not None and v >= max(_values_of(space.get("epochs"), max_epochs)):
            raise ConfigError(src, "space.lp_epochs", f"expected fewer than the epochs ({max_epochs}), got {v}")
