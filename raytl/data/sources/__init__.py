"""Data sources: one loader per kind of input, all returning :class:`ImageData`.

``load_data`` is the single entry point the rest of raytl uses. Loaders never drop a file
silently: an unreadable image is either recorded as a :class:`SkippedFile` (and announced in
one warning that counts and names them) or, with ``on_bad_file="error"``, stops the load
with a :class:`DataError` that names the file and the reason.

One module per source family: :mod:`.imagefolder`, :mod:`.parquet`, :mod:`.fashion_mnist`
and :mod:`.builtin` (``digits``, ``synthetic``); :mod:`.decode` holds the parallel decoding
and bad-file policy that the file-based sources share.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

from raytl.data.dataset import DataError, ImageData
from raytl.data.images import DEFAULT_MAX_PIXELS
from raytl.data.sources.builtin import load_digits, load_synthetic
from raytl.data.sources.fashion_mnist import load_fashion_mnist
from raytl.data.sources.imagefolder import load_imagefolder
from raytl.data.sources.parquet import load_parquet
from raytl.data.splits import stratified_indices
from raytl.data.stream import MODES

ON_BAD_FILE = ("skip", "error")

SOURCES: dict[str, Callable[..., ImageData]] = {
    "imagefolder": load_imagefolder,
    "parquet": load_parquet,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "synthetic": load_synthetic,
}
"""Loaders by source name; ``load_data`` passes each only the options it declares."""

__all__ = ["ON_BAD_FILE", "SOURCES", "load_data", "stratified_subset"]


def load_data(
    source: str,
    *,
    path: str | None = None,
    image_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    on_bad_file: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    download: bool = False,
    synthetic_classes: int = 4,
    synthetic_per_class: int = 60,
    mode: str = "memory",
) -> ImageData:
    """Load a data source by name into memory, optionally as a stratified subsample.

    Args:
        source: One of :data:`SOURCES` (``imagefolder``, ``parquet``, ``fashion-mnist``,
            ``digits``, ``synthetic``).
        path: Folder or file for ``imagefolder``, ``parquet`` and ``fashion-mnist``.
        image_size: Side of the square images decoded from files (imagefolder, parquet);
            built-in datasets keep their native size.
        limit: Keep only this many images, stratified by class and deterministic in ``seed``.
        seed: Seed for ``limit`` and for the ``synthetic`` generator.
        on_bad_file: ``"skip"`` records unreadable files in ``ImageData.skipped``;
            ``"error"`` raises a :class:`DataError` naming the first one.
        max_pixels: Refuse (skip) images with more pixels than this (decompression bombs).
        download: Let ``fashion-mnist`` fetch its files with torchvision if they are missing.
        synthetic_classes: Number of classes of the ``synthetic`` source.
        synthetic_per_class: Images per class of the ``synthetic`` source.
        mode: ``memory`` (decode everything now), ``stream`` (keep a checked index, decode
            where the images are used: imagefolder and parquet) or ``auto`` (stream when the
            decoded images would not fit a share of memory, :func:`raytl.data.stream.choose_mode`).

    Raises:
        DataError: Unknown source, bad option, or a problem with the data itself.
    """
    _check_options(source, image_size, limit, on_bad_file, max_pixels, mode)
    options = {
        "mode": mode,
        "path": path,
        "image_size": image_size,
        "seed": seed,
        "limit": limit,  # the file sources sample their index before decoding anything
        "on_bad_file": on_bad_file,
        "max_pixels": max_pixels,
        "download": download,
        "synthetic_classes": synthetic_classes,
        "synthetic_per_class": synthetic_per_class,
    }
    loader = SOURCES[source]
    accepted = inspect.signature(loader).parameters
    if path is not None and "path" not in accepted:
        warnings.warn(f"data source {source!r} takes no path; ignoring path={path!r}", stacklevel=2)
    data = loader(**{k: v for k, v in options.items() if k in accepted})
    if limit is not None and limit < len(data):
        data = stratified_subset(data, limit, seed=seed)
    return data


def _check_options(
    source: str, image_size: int, limit: int | None, on_bad_file: str, max_pixels: int, mode: str
) -> None:
    """Refuse an unknown source or a bad option before any file is touched."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    if on_bad_file not in ON_BAD_FILE:
        raise DataError(f"on_bad_file must be one of {ON_BAD_FILE}, got {on_bad_file!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or null, got {limit!r}")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if mode not in MODES:
        raise DataError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "stream" and "mode" not in inspect.signature(SOURCES[source]).parameters:
        raise DataError(
            f"data source {source!r} is built in and held in memory; streaming (mode: stream) "
            "reads files: use the imagefolder or parquet source (raytl data convert writes shards)"
        )


def stratified_subset(data: ImageData, limit: int, *, seed: int) -> ImageData:
    """A deterministic, class-stratified subsample of ``limit`` images, in original order."""
    return data.subset(stratified_indices(data.labels, limit, seed=seed))
