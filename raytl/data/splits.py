"""Deterministic, stratified splits: the test split is carved once, first, never used for selection.

Everything here returns index arrays into one :class:`~raytl.data.ImageData`; the same seed and
the same data always give the same indices (scikit-learn's stratified splitters, seeded).

Given ``groups`` (``ImageData.groups``: byte-identical files share a group), every split keeps a
group on one side, so no copy of a test image is trained on: the groups are split, stratified by
the label of each group's first image, and expanded back to images. Without copies among the
indices the split is the plain one, index for index.
"""

from __future__ import annotations

import numpy as np

from raytl.data.dataset import DataError

# scikit-learn's splitters are imported where they cut: a Ray Train worker gets its units cut
# by the driver and never imports scikit-learn (with SciPy, 0.85 s of every trial's start-up)


def stratified_indices(labels: np.ndarray, limit: int, *, seed: int) -> np.ndarray:
    """The sorted indices of a deterministic, class-stratified sample of ``limit`` of ``labels``
    (all of them when there are no more than ``limit``). Works on labels alone, so a source can
    take it before decoding anything."""
    everything = np.arange(len(labels))
    if limit >= len(labels):
        return everything
    present = int(np.count_nonzero(np.bincount(labels)))
    if limit < present:
        raise DataError(
            f"limit={limit} is smaller than the number of classes ({present}); "
            "a stratified subsample needs at least one image per class"
        )
    if len(labels) - limit < present:
        # sklearn needs the left-out part to hold every class too; dropping fewer images than
        # there are classes cannot be stratified anyway, so drop a seeded random few.
        rng = np.random.default_rng(seed)
        dropped = rng.choice(everything, size=len(labels) - limit, replace=False)
        return np.setdiff1d(everything, dropped)
    from sklearn.model_selection import train_test_split

    try:
        kept, _ = train_test_split(everything, train_size=limit, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot take a stratified sample of {limit} images: {exc}") from exc
    return np.sort(kept)


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
    *,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, part), ``fraction`` of each class in ``part``; both sorted.

    With ``groups`` (one id per image of the dataset), the images of a group end up on one side.
    """
    if not has_copies(groups, indices):
        return _plain_split(labels, indices, fraction, seed, class_names, why)
    assert groups is not None
    indices = np.asarray(indices)
    firsts = first_of_groups(groups, indices)
    _, part_firsts = _plain_split(
        labels, firsts, fraction, seed, class_names, f"{why} (byte-identical copies count once)"
    )
    in_part = np.isin(groups[indices], groups[part_firsts])
    return np.sort(indices[~in_part]), np.sort(indices[in_part])


def _plain_split(
    labels: np.ndarray,
    indices: np.ndarray,
    fraction: float,
    seed: int,
    class_names: tuple[str, ...],
    why: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The stratified split of single images (scikit-learn's, seeded)."""
    check_class_sizes(labels, indices, 2, class_names, why)
    n_classes = len(np.unique(labels[indices]))
    n_part = max(int(round(fraction * len(indices))), n_classes)
    if len(indices) - n_part < n_classes:
        raise DataError(
            f"{len(indices)} images are too few for {why} (fraction {fraction}) "
            f"over {n_classes} classes"
        )
    from sklearn.model_selection import train_test_split

    rest, part = train_test_split(
        indices, test_size=n_part, stratify=labels[indices], random_state=seed
    )
    return np.sort(rest), np.sort(part)


def has_copies(groups: np.ndarray | None, indices: np.ndarray) -> bool:
    """Whether two of ``indices`` share a group (are copies of one file)."""
    if groups is None:
        return False
    members = np.asarray(groups)[np.asarray(indices)]
    return len(np.unique(members)) < len(members)


def first_of_groups(groups: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The first index of every group among ``indices``, sorted (one image per group)."""
    indices = np.asarray(indices)
    _, first = np.unique(groups[indices], return_index=True)
    return np.sort(indices[first])


def stratified_folds(
    labels: np.ndarray,
    pool: np.ndarray,
    k: int,
    seed: int,
    *,
    groups: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` stratified (train, val) folds of ``pool``, sorted; a group stays in one fold.

    Without copies in ``pool`` these are scikit-learn's ``StratifiedKFold`` folds (shuffled,
    seeded), as the cv and segments schemes cut them; with copies, ``StratifiedGroupKFold``'s.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    pool = np.asarray(pool)
    if has_copies(groups, pool):
        assert groups is not None
        cutter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = cutter.split(pool, labels[pool], groups[pool])
    else:
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(
            pool, labels[pool]
        )
    return [(np.sort(pool[train]), np.sort(pool[val])) for train, val in folds]


def carve_test(
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
    class_names: tuple[str, ...],
    *,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test): the untouched test split, carved once per dataset and seed.

    Pass ``groups=data.groups`` so that no byte-identical copy of a test image is in the pool.
    """
    return stratified_split(
        labels,
        np.arange(len(labels)),
        test_fraction,
        seed,
        class_names,
        "the test split",
        groups=groups,
    )
