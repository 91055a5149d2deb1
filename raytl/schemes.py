"""Evaluation schemes: which indices each unit trains and validates on, and which ranks train it.

A scheme turns the training pool (everything but the test split) into units; each unit is an
independent model with its own train/val indices:

- ``holdout``: one stratified train/val split.
- ``cv``: k stratified folds; unit i validates on fold i and trains on the rest.
- ``segments``: the pool cut into S disjoint stratified segments, each with its own train/val split,
  so S smaller models train side by side on data none of the others sees.

A trial's W Ray Train workers share the U units (see :func:`assign_units`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from raytl.data.splits import (
    check_class_sizes,
    first_of_groups,
    has_copies,
    stratified_folds,
    stratified_split,
)
from raytl.errors import RaytlError


@dataclass(frozen=True)
class Unit:
    """One independent model's data: indices into the dataset."""

    name: str
    train: np.ndarray
    val: np.ndarray


@dataclass(frozen=True)
class SplitSpec:
    """What every scheme's cutter receives besides its size (folds, segments)."""

    labels: np.ndarray
    pool: np.ndarray
    val_fraction: float
    seed: int
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None  # byte-identical copies share a group: kept on one side

    @property
    def distinct(self) -> np.ndarray:
        """One image per group of the pool: what class sizes count (a copy adds no image)."""
        if not has_copies(self.groups, self.pool):
            return self.pool
        assert self.groups is not None
        return first_of_groups(self.groups, self.pool)


def _holdout(size: int, s: SplitSpec) -> list[Unit]:
    train, val = stratified_split(
        s.labels,
        s.pool,
        s.val_fraction,
        s.seed,
        s.class_names,
        "the holdout split",
        groups=s.groups,
    )
    return [Unit("holdout", train, val)]


def _cv(k: int, s: SplitSpec) -> list[Unit]:
    check_class_sizes(s.labels, s.distinct, k, s.class_names, f"cross-validation with {k} folds")
    folds = stratified_folds(s.labels, s.pool, k, s.seed, groups=s.groups)
    return [Unit(f"fold_{i}", train, val) for i, (train, val) in enumerate(folds)]


def _segments(count: int, s: SplitSpec) -> list[Unit]:
    # each segment needs two images per class of its own to split into train and val
    check_class_sizes(s.labels, s.distinct, 2 * count, s.class_names, f"{count} segments")
    if count == 1:
        parts = [s.pool]
    elif has_copies(s.groups, s.pool):  # StratifiedGroupKFold's parts: a group in one segment
        parts = [
            part for _, part in stratified_folds(s.labels, s.pool, count, s.seed, groups=s.groups)
        ]
    else:  # the parts in StratifiedKFold's own order, as every seeded result so far was cut
        from sklearn.model_selection import StratifiedKFold  # where it cuts (see data.splits)

        cutter = StratifiedKFold(n_splits=count, shuffle=True, random_state=s.seed)
        parts = [s.pool[part] for _, part in cutter.split(s.pool, s.labels[s.pool])]
    units = []
    for i, part in enumerate(parts):
        train, val = stratified_split(
            s.labels,
            part,
            s.val_fraction,
            s.seed + i,
            s.class_names,
            f"segment {i}'s validation split",
            groups=s.groups,
        )
        units.append(Unit(f"segment_{i}", train, val))
    return units


@dataclass(frozen=True)
class Scheme:
    """A named way to cut the pool into units; ``size_key`` names the config key giving how many
    (None: always one unit)."""

    name: str
    cut: Callable[[int, SplitSpec], list[Unit]]
    size_key: str | None


SCHEMES: dict[str, Scheme] = {
    "holdout": Scheme("holdout", _holdout, None),
    "cv": Scheme("cv", _cv, "folds"),
    "segments": Scheme("segments", _segments, "segments"),
}


def make_units(
    kind: str,
    size: int,
    labels: np.ndarray,
    pool: np.ndarray,
    *,
    val_fraction: float,
    seed: int,
    class_names: tuple[str, ...],
    groups: np.ndarray | None = None,
) -> list[Unit]:
    """The scheme's ``size`` units over ``pool``; deterministic for a given seed. ``groups``
    (``ImageData.groups``) keeps every byte-identical copy in the same unit and split."""
    spec = SplitSpec(labels, np.asarray(pool), val_fraction, seed, class_names, groups)
    return SCHEMES[kind].cut(size, spec)


@dataclass(frozen=True)
class Assignment:
    """What one rank trains: a unit, and its place among the ranks that share that unit."""

    unit: int
    rank_in_unit: int
    ranks_per_unit: int


def assign_units(n_units: int, world_size: int) -> list[list[Assignment]]:
    """Per rank, the units it trains.

    With ``world_size <= n_units`` units go round-robin to ranks (each rank trains its units on its
    own). With more workers than units, ``world_size`` must be a multiple of ``n_units`` and each
    unit trains data-parallel on ``world_size / n_units`` consecutive ranks.
    """
    if world_size <= n_units:
        return [
            [Assignment(u, 0, 1) for u in range(r, n_units, world_size)] for r in range(world_size)
        ]
    if world_size % n_units:
        raise RaytlError(
            f"{world_size} workers cannot share {n_units} units evenly: use at most {n_units} "
            f"workers, or a multiple of {n_units}"
        )
    per = world_size // n_units
    return [[Assignment(r // per, r % per, per)] for r in range(world_size)]
