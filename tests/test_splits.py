"""Splits are stratified, disjoint and deterministic; too-small classes fail with a clear error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from raytl.data.dataset import DataError
from raytl.data.splits import carve_test, stratified_folds, stratified_split


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


def test_pool_size_subsamples_the_pool_stratified_and_keeps_the_test_split_whole(digits):
    from raytl.config import DataConfig

    full = DataConfig(source="digits", seed=3)
    pool, test = full.split_test(digits)
    small_pool, same_test = dataclasses.replace(full, pool_size=300).split_test(digits)
    assert np.array_equal(test, same_test)  # pools of any size are tested on the same images
    assert len(small_pool) == 300 and set(small_pool) <= set(pool)
    assert np.bincount(digits.labels[small_pool], minlength=10).min() >= 29  # 30 per class
    again, _ = dataclasses.replace(full, pool_size=300).split_test(digits)
    assert np.array_equal(small_pool, again)


def test_class_too_small_names_the_class():
    labels = np.array([0] * 20 + [1] * 20 + [2])
    with pytest.raises(DataError, match="class 'c' has 1 image"):
        carve_test(labels, 0.2, 0, ("a", "b", "c"))


# --------------------------------------------------------------------------------------------
# byte-identical copies (ImageData.groups) stay on one side of every split


def copies_dataset() -> tuple[np.ndarray, np.ndarray]:
    """3 classes of 30 files; in each class files 1-4 copy file 0 and files 5-6 copy file 7."""
    labels = np.repeat(np.arange(3), 30)
    groups = np.arange(90)
    for c in range(3):
        groups[30 * c + 1 : 30 * c + 5] = 30 * c
        groups[30 * c + 5 : 30 * c + 7] = 30 * c + 7
    return labels, groups


def sides_of_groups(groups: np.ndarray, a: np.ndarray, b: np.ndarray) -> set[int]:
    """The groups with members on both sides."""
    return set(groups[a].tolist()) & set(groups[b].tolist())


def test_copies_stay_on_one_side_of_the_test_and_validation_splits():
    labels, groups = copies_dataset()
    names = ("a", "b", "c")
    split_by_plain = 0
    for seed in range(10):
        pool, test = carve_test(labels, 0.2, seed, names, groups=groups)
        assert sides_of_groups(groups, pool, test) == set()
        assert len(pool) + len(test) == 90 and not set(pool) & set(test)
        assert set(np.unique(labels[test])) == {0, 1, 2}  # still stratified
        again = carve_test(labels, 0.2, seed, names, groups=groups)
        assert np.array_equal(test, again[1]) and np.array_equal(pool, again[0])
        train, val = stratified_split(labels, pool, 0.25, seed, names, "v", groups=groups)
        assert sides_of_groups(groups, train, val) == set()
        assert np.array_equal(np.sort(np.concatenate([train, val])), pool)
        plain_pool, plain_test = carve_test(labels, 0.2, seed, names)
        split_by_plain += bool(sides_of_groups(groups, plain_pool, plain_test))
    assert split_by_plain > 0  # without groups, copies do leak across the split


def test_without_copies_the_split_is_exactly_the_plain_one(digits):
    groups = np.arange(len(digits))
    for seed in (0, 1, 7):
        plain = carve_test(digits.labels, 0.2, seed, digits.class_names)
        grouped = carve_test(digits.labels, 0.2, seed, digits.class_names, groups=groups)
        assert all(np.array_equal(p, g) for p, g in zip(plain, grouped, strict=True))
        plain_val = stratified_split(digits.labels, plain[0], 0.2, seed, digits.class_names, "v")
        grouped_val = stratified_split(
            digits.labels, plain[0], 0.2, seed, digits.class_names, "v", groups=digits.groups
        )
        assert all(np.array_equal(p, g) for p, g in zip(plain_val, grouped_val, strict=True))


def test_stratified_folds_keep_copies_in_one_fold_and_match_the_cv_scheme_without():
    from raytl.schemes import make_units

    labels, groups = copies_dataset()
    pool, _ = carve_test(labels, 0.2, 0, ("a", "b", "c"), groups=groups)
    folds = stratified_folds(labels, pool, 3, 0, groups=groups)
    assert len(folds) == 3
    for train, val in folds:
        assert sides_of_groups(groups, train, val) == set()
        assert np.array_equal(np.sort(np.concatenate([train, val])), pool)
    vals = np.concatenate([val for _, val in folds])
    assert np.array_equal(np.sort(vals), pool)  # every image validated once

    plain = stratified_folds(labels, pool, 3, 0, groups=np.arange(90))
    units = make_units("cv", 3, labels, pool, val_fraction=0.2, seed=0, class_names=("a", "b", "c"))
    for (train, val), unit in zip(plain, units, strict=True):
        assert np.array_equal(train, unit.train) and np.array_equal(val, unit.val)


def test_a_class_of_copies_counts_its_distinct_images():
    labels = np.array([0] * 20 + [1] * 20 + [2] * 3)
    groups = np.arange(43)
    groups[40:] = 40  # class 'c': three copies of one file
    with pytest.raises(DataError, match=r"class 'c' has 1 image\(s\) but the test split \(byte"):
        carve_test(labels, 0.2, 0, ("a", "b", "c"), groups=groups)


def test_copies_in_a_real_folder_never_straddle_the_test_split(tmp_path):
    from PIL import Image

    from raytl.data import load_data

    root = tmp_path / "data"
    for c, name in enumerate(("ant", "bee")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), (c * 100, i * 20, 7)).save(root / name / f"{i:02d}.png")
    copies = {
        "ant/00.png": ["ant/c1.png", "ant/c2.png", "bee/c3.png"],
        "bee/05.png": ["bee/c4.png"],
    }
    for original, targets in copies.items():
        for target in targets:
            (root / target).write_bytes((root / original).read_bytes())
    data = load_data("imagefolder", path=str(root), image_size=8)
    assert len(data) == 28 and data.duplicates == 3  # bee/c3.png, filed under another class, apart
    for seed in range(5):
        pool, test = carve_test(data.labels, 0.3, seed, data.class_names, groups=data.groups)
        assert sides_of_groups(data.groups, pool, test) == set()
