"""Data loading for raytl: every source becomes one in-memory :class:`ImageData`.

Sources are image folders, Parquet shards of encoded images, Fashion-MNIST (offline from
Debian's package), scikit-learn's digits and a synthetic set for tests. Unreadable files are
reported (``ImageData.skipped``, ``inspect_source``), never silently dropped.
"""

from __future__ import annotations

from raytl.data.convert import convert_imagefolder
from raytl.data.dataset import DataError, ImageData, SkippedFile
from raytl.data.images import IMAGE_EXTENSIONS
from raytl.data.inspect import InspectReport, inspect_source
from raytl.data.sources import SOURCES, load_data

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "DataError",
    "ImageData",
    "InspectReport",
    "SkippedFile",
    "convert_imagefolder",
    "inspect_source",
    "load_data",
]
