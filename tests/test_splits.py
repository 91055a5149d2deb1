"""Splits are stratified, disjoint and deterministic; too-small classes fail with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from raytl.data.dataset import DataError
from raytl.data.splits import carve_test, stratified_split


def test_test_split_is_stratified_disjoint_deterministic(digits):
    pool, test = carve_test(digits.labels, 0.2, 0, digits.class_names)
    assert len(np.intersect1d(pool, test)) == 0
    assert len(pool) + len(test) == len(digits)
    assert abs(len(test) - 0.2 * len(digits)) <= 1
    again = carve_test(digits.labels, 0.2, 0, digits.class_names)
    assert np.array_equal(test, again[1])
    other = carve_test(digits.labels, 0.2, 1, digits.class_names)
    assert not np.array_equal(test, other[1])
    per_class = np.bincount(digits.labels, minlength=10)
    share = np.bincount(digits.labels[test], minlength=10) / per_class
    assert np.all(np.abs(share - 0.2) < 0.02)  # every class keeps its proportion


def test_validation_split_comes_from_the_pool_only(digits):
    pool, test = carve_test(digits.labels, 0.2, 0, digits.class_names)
    train, val = stratified_split(digits.labels, pool, 0.25, 0, digits.class_names, "validation")
    assert set(train) | set(val) == set(pool)
    assert not set(val) & set(test) and not set(train) & set(val)


def test_class_too_small_names_the_class():
    labels = np.array([0] * 20 + [1] * 20 + [2])
    with pytest.raises(DataError, match="class 'c' has 1 image"):
        carve_test(labels, 0.2, 0, ("a", "b", "c"))
