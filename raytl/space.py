"""The ``space`` section: a trial's hyperparameters and how the search samples them.

:class:`Hyperparameters` is everything one trial can set; the ``space`` section fixes or samples
each field through a :class:`ParamSpec` (a constant, ``choice``, ``int``, ``uniform`` or
``loguniform``), optionally conditional on a choice through ``when``. :class:`DefineByRun` is the
Optuna define-by-run function that samples parents before the entries conditional on them.
"""

from __future__ import annotations

import graphlib
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal

from raytl.errors import ConfigError
from raytl.schema import OneOf, base_type, coerce, hints, reject_unknown, require
from raytl.strategies import STRATEGIES

DISTRIBUTIONS = ("choice", "int", "uniform", "loguniform")
StrategyName = Annotated[str, OneOf(tuple(STRATEGIES))]


@dataclass(frozen=True)
class Hyperparameters:
    """One trial's full configuration; the ``space`` section samples or fixes these fields.

    ``freeze_depth`` counts the backbone's blocks in forward order, stem first (see
    :func:`raytl.models.backbone_blocks`): 0 freezes nothing, ``k`` freezes the first ``k``.
    """

    strategy: StrategyName = "fine_tune"
    backbone: str | None = None  # None: the model section's backbone
    freeze_depth: int = 0
    head_lr: float = 3e-3
    backbone_lr: float = 3e-4
    layer_decay: float = 1.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    # balanced: the training loss weighs class c by n / (classes * count_c) over the unit's own
    # train labels (scikit-learn's "balanced"), for imbalanced data; validation stays unweighted
    class_weight: Literal["none", "balanced"] = "none"
    batch_size: int = 64
    epochs: int | None = None  # None: search.max_epochs
    augment: bool = False

    @property
    def backbone_name(self) -> str:
        """The backbone, once resolved (``SpaceConfig.hyperparameters`` always fills it in)."""
        if self.backbone is None:
            raise ValueError("hyperparameters without a backbone: resolve them with the space")
        return self.backbone


HYPERPARAMETER_NAMES = tuple(f.name for f in fields(Hyperparameters))


@dataclass(frozen=True)
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

    def options(self) -> list[Any]:
        """The values a constant or a choice can take; the bounds of a range."""
        return list(self.values) if self.kind in ("const", "choice") else [self.low, self.high]

    def to_yaml(self) -> Any:
        """The YAML form of this entry (the inverse of :func:`parse_params`)."""
        entry: Any
        if self.kind == "const":
            if not self.when:
                return self.values[0]
            entry = {"value": self.values[0]}
        elif self.kind == "choice":
            entry = {"choice": list(self.values)}
        elif self.kind == "int":
            entry = {"int": [int(self.low), int(self.high)]}
            if self.step != 1:
                entry["step"] = self.step
        else:
            entry = {self.kind: [self.low, self.high]}
        if self.when:
            entry["when"] = {k: list(v) for k, v in self.when.items()}
        return entry


def _parse_range(name: str, kind: str, entry: dict[str, Any], source: str) -> ParamSpec:
    key, body, hint = f"space.{name}", entry[kind], hints(Hyperparameters)[name]
    if not isinstance(body, list) or len(body) != 2:
        raise ConfigError(source, f"{key}.{kind}", f"expected [low, high], got {body!r}")
    number = int if kind == "int" else float
    if base_type(hint) is not number:
        what = "an integer" if kind == "int" else "a real-valued"
        raise ConfigError(source, f"{key}.{kind}", f"{name} is not {what} hyperparameter")
    low, high = (coerce(v, number, source, f"{key}.{kind}") for v in body)
    if not low <= high:
        raise ConfigError(source, f"{key}.{kind}", f"low <= high must hold, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(source, f"{key}.loguniform", f"low must be > 0, got {low}")
    if kind != "int" and "step" in entry:
        raise ConfigError(source, f"{key}.step", "step applies to int ranges only")
    step = coerce(entry.get("step", 1), int, source, f"{key}.step")
    return ParamSpec(name, kind, low=low, high=high, step=step)  # type: ignore[arg-type]


def parse_param(name: str, entry: Any, source: str) -> ParamSpec:
    """One ``space`` entry: a constant, or a mapping with one distribution (and ``when``)."""
    key, hint = f"space.{name}", hints(Hyperparameters)[name]
    if not isinstance(entry, dict):
        return ParamSpec(name, "const", (coerce(entry, hint, source, key),))
    kinds = [k for k in entry if k in (*DISTRIBUTIONS, "value")]
    extra = [k for k in entry if k not in (*DISTRIBUTIONS, "value", "when", "step")]
    if len(kinds) != 1 or extra:
        raise ConfigError(
            source,
            key,
            "expected a constant or a mapping with exactly one of "
            f"choice, int, uniform, loguniform, value (plus optional when, step); got keys {sorted(entry)}",
        )
    kind, body = kinds[0], entry[kinds[0]]
    when = _parse_when(entry.get("when"), source, key)
    if kind == "value":
        return ParamSpec(name, "const", (coerce(body, hint, source, key),), when=when)
    if kind == "choice":
        if not isinstance(body, list) or not body:
            raise ConfigError(source, f"{key}.choice", f"expected a non-empty list, got {body!r}")
        values = tuple(coerce(v, hint, source, f"{key}.choice") for v in body)
        return ParamSpec(name, "choice", values, when=when)
    spec = _parse_range(name, kind, entry, source)
    return ParamSpec(spec.name, spec.kind, low=spec.low, high=spec.high, step=spec.step, when=when)


def parse_params(space_raw: dict[str, Any], source: str) -> dict[str, ParamSpec]:
    """Parse the ``space`` section, checking types against :class:`Hyperparameters` and that
    every condition names a choice (or constant) with values it can take."""
    if "lp_epochs" in space_raw:
        raise ConfigError(
            source,
            "space.lp_epochs",
            "lp_ft's probe phase now trains its head to convergence (early stopping on validation "
            "loss) in the trial's first report; remove this key",
        )
    reject_unknown(space_raw, list(HYPERPARAMETER_NAMES), source, "space")
    specs = {name: parse_param(name, entry, source) for name, entry in space_raw.items()}
    for spec in specs.values():
        for cond, allowed in spec.when.items():
            key, target = f"space.{spec.name}.when.{cond}", specs.get(cond)
            if target is None or target.kind not in ("choice", "const"):
                raise ConfigError(
                    source, key, "a condition must name a choice (or constant) in the space section"
                )
            for v in allowed:  # each value must at least be one the hyperparameter can take
                coerce(v, hints(Hyperparameters)[cond], source, key)
            bad = [v for v in allowed if v not in target.values]
            if bad and target.kind == "choice":  # a constant (e.g. fixed by --set) may exclude them
                raise ConfigError(
                    source, key, f"{bad} not among {cond}'s values {list(target.values)}"
                )
    condition_order(specs, source)  # no cycles
    return specs


def _parse_when(when: Any, source: str, key: str) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise ConfigError(source, f"{key}.when", f"expected a mapping name: [values], got {when!r}")
    return {str(c): tuple(a if isinstance(a, list) else [a]) for c, a in when.items()}


def condition_order(specs: dict[str, ParamSpec], source: str = "<memory>") -> list[ParamSpec]:
    """The entries in the file's order, except that a condition's target comes before the
    entries that depend on it; a cycle of conditions is an error naming it.

    The order is the order Optuna samples in, so the file's order keeps a seeded search the same.
    """
    sorter = graphlib.TopologicalSorter({name: list(spec.when) for name, spec in specs.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        cycle = list(reversed(exc.args[1]))
        raise ConfigError(
            source, f"space.{cycle[0]}.when", f"circular condition {' -> '.join(cycle)}"
        ) from None
    position = {name: i for i, name in enumerate(specs)}
    ready: set[str] = set()
    ordered = []
    while sorter.is_active():
        ready.update(sorter.get_ready())
        name = min(ready, key=position.__getitem__)
        ready.remove(name)
        ordered.append(specs[name])
        sorter.done(name)
    return ordered


class DefineByRun:
    """Optuna's define-by-run function for the ``space`` section (a class so Tune can pickle it).

    Parents are sampled before the entries conditional on them, so an inactive entry is simply
    never suggested (Optuna then sees it as absent, which multivariate TPE with ``group=True``
    handles jointly). ``freeze_depth``'s upper bound follows the backbone sampled for the trial
    (``blocks``: each backbone's block count, :attr:`raytl.config.SpaceConfig.blocks`).
    """

    def __init__(self, space: dict[str, ParamSpec], blocks: dict[str, int]) -> None:
        self.ordered = condition_order(space)
        self.blocks = blocks

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for spec in self.ordered:
            if not spec.is_active(values):
                continue
            if spec.kind == "const":
                values[spec.name] = constants[spec.name] = spec.values[0]
            elif spec.kind == "choice":
                values[spec.name] = trial.suggest_categorical(spec.name, list(spec.values))
            elif spec.kind == "int":
                high = int(spec.high)
                if spec.name == "freeze_depth" and "backbone" in values:
                    high = min(high, self.blocks[values["backbone"]])
                values[spec.name] = trial.suggest_int(
                    spec.name, int(spec.low), high, step=spec.step
                )
            else:
                values[spec.name] = trial.suggest_float(
                    spec.name, spec.low, spec.high, log=spec.kind == "loguniform"
                )
        return constants or None


def check_positive(specs: dict[str, ParamSpec]) -> None:
    """Learning rates, sizes and epochs > 0; smoothing and decay in [0, 1]; weight decay >= 0."""

    def values(name: str) -> list[Any]:
        spec = specs.get(name)
        return spec.options() if spec is not None else []

    for name in ("head_lr", "backbone_lr", "batch_size", "epochs", "layer_decay"):
        for v in values(name):
            require(v is None or v > 0, f"space.{name}", f"expected > 0, got {v}")
    for name in ("label_smoothing", "layer_decay"):
        for v in values(name):
            require(0 <= v <= 1.0, f"space.{name}", f"expected in [0, 1.0], got {v}")
    for v in values("weight_decay"):
        require(v >= 0, "space.weight_decay", f"expected >= 0, got {v}")
