"""Seeded recipes: known-good configurations a search evaluates first, before TPE takes over.

They go to Optuna as enqueued trials (Tune's ``points_to_evaluate``), so the first trials of a
search are the configurations a practitioner would try first, and TPE starts from their scores.
``search.seed_configs`` replaces them with the user's own list (``[]``: none). Each default
recipe is fitted to the space: it sets only what the space searches, clipped into its ranges; one
whose strategy the space does not offer is left out (docs/space-file.md lists them with sources).

The recipes keep their sources' structure (which blocks train, layer decay, probe then fine-tune)
but not their rates: those were set for schedules of thousands of steps, and raytl's searches give a
trial a few epochs. The fine-tuning rate is fastai's ``fine_tune`` default for AdamW, built for
few-epoch fine-tuning (1e-3 for the top of the backbone after its frozen epoch, batch 64, head 10x),
scaled with the square root of the batch (Adam's rule, Malladi et al. 2022) where BiT and MAE scale
SGD's linearly. Measured before the change (docs/benchmarks.md): BiT's and MAE's rates carried over
to AdamW (1e-3 x B/256) reached 0.79 and 0.24 validation accuracy in 3 epochs on digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from raytl.errors import ConfigError
from raytl.space import HYPERPARAMETER_NAMES, Hyperparameters, ParamSpec

DEFAULT_BATCH = Hyperparameters().batch_size
Recipe = Callable[[int, int], dict[str, Any]]  # (batch size, the backbones' fewest blocks) -> point


def _linear_probe(batch: int, blocks: int) -> dict[str, Any]:
    # a head on frozen features, trained to convergence in one report (raytl.probe)
    return {"strategy": "linear_probe", "head_lr": 1e-2}


def _rate(batch: int) -> float:
    """AdamW's few-epoch fine-tuning rate at ``batch`` (the module's docstring says why)."""
    return 1e-3 * math.sqrt(batch / 64)


def _top_blocks(batch: int, blocks: int) -> dict[str, Any]:
    # BiT-HyperRule (Kolesnikov et al. 2020): a fixed fine-tuning rule; here the top half
    return {
        "strategy": "fine_tune",
        "freeze_depth": blocks // 2,
        "backbone_lr": _rate(batch),
        "head_lr": 10 * _rate(batch),
    }


def _full_with_layer_decay(batch: int, blocks: int) -> dict[str, Any]:
    # MAE's fine-tuning recipe (He et al. 2022): every block, layer decay 0.65-0.75
    return {
        "strategy": "fine_tune",
        "freeze_depth": 0,
        "layer_decay": 0.7,
        "backbone_lr": _rate(batch),
        "head_lr": 10 * _rate(batch),
    }


def _lp_ft(batch: int, blocks: int) -> dict[str, Any]:
    # LP-FT (Kumar et al. 2022): a converged probe, then all blocks at a small rate
    return {"strategy": "lp_ft", "freeze_depth": 0, "head_lr": 1e-2, "backbone_lr": 1e-4}


RECIPES: dict[str, Recipe] = {
    "linear_probe": _linear_probe,
    "top_blocks": _top_blocks,
    "full_with_layer_decay": _full_with_layer_decay,
    "lp_ft": _lp_ft,
}


def _fit(spec: ParamSpec, value: Any) -> Any | None:
    """``value`` moved into what ``spec`` can sample (None: a choice that does not offer it)."""
    if spec.kind == "choice":
        return value if value in spec.values else None
    clipped = min(max(value, spec.low), spec.high)
    if spec.kind == "int":
        return int(spec.low + round((clipped - spec.low) / spec.step) * spec.step)
    return float(clipped)


def _offers(space: dict[str, ParamSpec], strategy: str) -> bool:
    spec = space.get("strategy")
    if spec is None:
        return strategy == Hyperparameters().strategy
    return strategy in spec.options()


def default_points(
    space: dict[str, ParamSpec], backbone: str, blocks: dict[str, int]
) -> list[dict[str, Any]]:
    """The default recipes fitted to ``space``: searched values only, within their ranges, each
    point once (a point with nothing searched is left out). ``blocks``: each backbone's block
    count (:attr:`raytl.config.SpaceConfig.blocks`)."""
    batch_spec = space.get("batch_size")
    batch = DEFAULT_BATCH if batch_spec is None else int(batch_spec.options()[0])
    if batch_spec is not None and batch_spec.kind != "const":
        batch = int(_fit(batch_spec, DEFAULT_BATCH) or batch)
    backbones = space["backbone"].options() if "backbone" in space else [backbone]
    fewest = min(blocks[b] for b in backbones)
    points: list[dict[str, Any]] = []
    for recipe in RECIPES.values():
        wanted = {**recipe(batch, fewest), "batch_size": batch}
        if not _offers(space, wanted["strategy"]):
            continue
        point: dict[str, Any] = {}
        for name, value in wanted.items():
            spec = space.get(name)
            if spec is None or spec.kind == "const" or not spec.is_active({**wanted, **point}):
                continue
            fitted = _fit(spec, value)
            if fitted is not None:
                point[name] = fitted
        if point and point not in points:
            points.append(point)
    return points


def check_points(points: list[dict[str, Any]], space: dict[str, ParamSpec], source: str) -> None:
    """The user's ``search.seed_configs``: every key a hyperparameter this space searches (and
    active for the point's strategy), every value one it can sample; else a ConfigError naming
    the entry and the key."""
    for i, point in enumerate(points):
        where = f"search.seed_configs[{i}]"
        if not isinstance(point, dict):
            raise ConfigError(
                source, where, f"expected a mapping of hyperparameters, got {point!r}"
            )
        for name, value in point.items():
            key, spec = f"{where}.{name}", space.get(name)
            if name not in HYPERPARAMETER_NAMES:
                raise ConfigError(source, key, "not a hyperparameter")
            if spec is None or spec.kind == "const":
                raise ConfigError(source, key, "not searched by this space (its value is fixed)")
            if not spec.is_active(point):
                raise ConfigError(source, key, f"inactive for this entry (needs {spec.when})")
            if not _samples(spec, value):
                allowed = spec.values if spec.kind == "choice" else [spec.low, spec.high]
                raise ConfigError(
                    source, key, f"expected a value in {list(allowed)}, got {value!r}"
                )


def _samples(spec: ParamSpec, value: Any) -> bool:
    if spec.kind == "choice":
        return value in spec.values
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if spec.kind == "int" and (not float(value).is_integer() or (value - spec.low) % spec.step):
        return False
    return spec.low <= value <= spec.high
