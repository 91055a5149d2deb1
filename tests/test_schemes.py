"""Schemes: units are disjoint where they must be, stratified, deterministic; ranks share them evenly."""

from __future__ import annotations

import numpy as np
import pytest

from raytl.config import SchemeConfig
from raytl.data.dataset import DataError
from raytl.data.splits import carve_test
from raytl.errors import RaytlError
from raytl.schemes import Assignment, assign_units, make_units


@pytest.fixture(scope="module")
def pool_of(digits):
    pool, test = carve_test(digits.labels, 0.2, 0, digits.class_names)
    return pool, test


def units(digits, pool, **scheme):
    config = SchemeConfig(**scheme)
    return make_units(
        config.kind,
        config.size,
        digits.labels,
        pool,
        val_fraction=0.2,
        seed=0,
        class_names=digits.class_names,
    )


def test_cv_folds_partition_the_pool(digits, pool_of):
    pool, test = pool_of
    folds = units(digits, pool, kind="cv", folds=3)
    assert [u.name for u in folds] == ["fold_0", "fold_1", "fold_2"]
    vals = np.concatenate([u.val for u in folds])
    assert sorted(vals) == sorted(pool)  # every pool image validates exactly once
    for u in folds:
        assert not set(u.train) & set(u.val)
        assert set(u.train) | set(u.val) == set(pool)
        assert not set(u.val) & set(test)
        share = np.bincount(digits.labels[u.val], minlength=10) / np.bincount(
            digits.labels[pool], minlength=10
        )
        assert np.all(np.abs(share - 1 / 3) < 0.03)  # stratified


def test_segments_are_disjoint_with_their_own_splits(digits, pool_of):
    pool, test = pool_of
    segs = units(digits, pool, kind="segments", segments=3)
    seen: set[int] = set()
    for u in segs:
        mine = set(u.train) | set(u.val)
        assert not mine & seen  # no image in two segments
        assert not set(u.train) & set(u.val)
        assert not mine & set(test)
        seen |= mine
        assert abs(len(u.val) / len(mine) - 0.2) < 0.03
    assert seen == set(pool)


def test_units_are_deterministic(digits, pool_of):
    pool, _ = pool_of
    a = units(digits, pool, kind="cv", folds=2)
    b = units(digits, pool, kind="cv", folds=2)
    assert all(np.array_equal(x.val, y.val) for x, y in zip(a, b, strict=True))
    holdout = units(digits, pool, kind="holdout")
    assert len(holdout) == 1 and holdout[0].name == "holdout"


def test_class_too_small_for_folds_says_how_many(digits):
    labels = np.array([0] * 30 + [1] * 30 + [2] * 2)
    with pytest.raises(DataError, match="class 'c' has 2 image.*needs at least 3"):
        make_units(
            "cv",
            SchemeConfig(kind="cv", folds=3).size,
            labels,
            np.arange(len(labels)),
            val_fraction=0.2,
            seed=0,
            class_names=("a", "b", "c"),
        )


def test_round_robin_when_fewer_workers_than_units():
    plan = assign_units(5, 2)
    assert [[a.unit for a in rank] for rank in plan] == [[0, 2, 4], [1, 3]]
    assert all(a.ranks_per_unit == 1 for rank in plan for a in rank)


def test_data_parallel_when_workers_are_a_multiple_of_units():
    plan = assign_units(2, 4)
    assert plan == [
        [Assignment(0, 0, 2)],
        [Assignment(0, 1, 2)],
        [Assignment(1, 0, 2)],
        [Assignment(1, 1, 2)],
    ]
    assert assign_units(1, 1) == [[Assignment(0, 0, 1)]]
    with pytest.raises(RaytlError, match="cannot share 2 units evenly"):
        assign_units(2, 3)


@pytest.mark.parametrize(("kind", "size"), [("holdout", 1), ("cv", 3), ("segments", 2)])
def test_byte_identical_copies_stay_in_one_unit_and_one_side(kind, size):
    """Copies of one file share a group: no unit trains on an image whose copy it validates on."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    groups = np.arange(len(labels))
    for original in rng.choice(len(labels), 30, replace=False):  # 30 files copied once or more
        copy = rng.choice(np.flatnonzero(labels == labels[original]))
        groups[groups == groups[copy]] = groups[original]
    units = make_units(
        kind,
        size,
        labels,
        np.arange(len(labels)),
        val_fraction=0.25,
        seed=0,
        class_names=("a", "b", "c"),
        groups=groups,
    )
    assert len(units) == size
    for unit in units:
        assert not set(groups[unit.train]) & set(groups[unit.val])
    if kind == "segments":  # and a group never spans two segments
        seen = [set(groups[np.concatenate([u.train, u.val])]) for u in units]
        assert not seen[0] & seen[1]
