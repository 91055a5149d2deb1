"""Deterministic, stratified splits: the test split is carved once, first, never used for selection.

Everything here returns index arrays into one :class:`~raytl.data.ImageData`; the same seed and
the same data always give the same indices (scikit-learn's stratified splitters, seeded).
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from raytl.data.dataset import DataError


def check_class_sizes(
    labels: np.ndarray,
    indices: np.ndarray,
    needed: int,
    class_names: tuple[str, ...],
    why: str,
) -> None:
    """Fail clearly if a class has fewer than ``needed`` images among ``indices``."""
    counts = np.bincount(labels[indices], minlength=len(class_names))
    for k, count in enumerate(counts):
        if count < needed:
            raise DataError(
                f"class {class_names[k]!r} has {count} image(s) but {why} needs at least {needed} "
                "per class; add images, merge the class, or lower the number of folds/segments"
            )


def stratified_split(
    labels: np.ndarray,
    indices: np.ndarray,
    fraction: float,
    seed: int,
    class_names: tuple[str, ...],
    why: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, part), ``fraction`` of each class in ``part``; both sorted."""
    check_class_sizes(labels, indices, 2, class_names, why)
    n_classes = len(np.unique(labels[indices]))
    n_part = max(int(round(fraction * len(indices))), n_classes)
    if len(indices) - n_part < n_classes:
        raise DataError(
            f"{len(indices)} images are too few for {why} (fraction {fraction}) "
            f"over {n_classes} classes"
        )
    rest, part = train_test_split(
        indices, test_size=n_part, stratify=labels[indices], random_state=seed
    )
    return np.sort(rest), np.sort(part)


def carve_test(
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
    class_names: tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test): the untouched test split, carved once per dataset and seed."""
    return stratified_split(
        labels, np.arange(len(labels)), test_fraction, seed, class_names, "the test split"
    )
