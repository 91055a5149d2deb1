"""The single in-memory dataset type that every data source produces.

Keeping one representation (a stacked RGB ``uint8`` array plus integer labels) means the
trainer, the splitter and Ray's object store never care where the images came from, and
the fingerprint gives runs a cheap way to prove they trained on identical data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa

from raytl.data.stream import StreamedImages, is_streamed, rows_of
from raytl.errors import RaytlError


class DataError(RaytlError, ValueError):
    """A user-facing data problem; the message names the file or folder and what was expected."""


@dataclass(frozen=True)
class SkippedFile:
    """An input file that could not be used, and why (reported, never silently dropped)."""

    path: str
    reason: str


@dataclass(frozen=True, eq=False)
class ImageData:
    """The one in-memory representation every source produces.

    Attributes:
        images: ``uint8`` array of shape ``(N, H, W, 3)``, RGB, C-contiguous; one size for all.
        labels: ``int64`` array of shape ``(N,)`` with values in ``[0, len(class_names))``.
        class_names: Names of the classes, indexed by label.
        source: Human description of where the data came from (shown in reports).
        skipped: Files that were found but could not be decoded.
        groups: integer array of shape ``(N,)`` (kept as ``int32`` below 2**31 images): images
            from byte-identical files of one class share a group id (splits keep a group on one
            side); by default each image is its own group.
        note: How the data is held (``data.mode``'s choice, said when a search starts).

    ``images`` may instead be a :class:`~raytl.data.stream.StreamedImages` (``data.mode:
    stream``): the same ``(N, H, W, 3)`` shape, indexed the same way, decoded when indexed.
    """

    images: np.ndarray | StreamedImages
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    skipped: tuple[SkippedFile, ...] = field(default=())
    groups: np.ndarray | None = None
    note: str = ""

    @property
    def streamed(self) -> bool:
        """Whether the images are decoded when used (``data.mode: stream``), not held."""
        return is_streamed(self.images)

    def __post_init__(self) -> None:
        """Validate once here so no consumer has to re-check shapes and label ranges."""
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) and not is_streamed(images):
            raise DataError(f"{self.source}: images must be a numpy array, got {type(images)}")
        if images.dtype != np.uint8:
            raise DataError(f"{self.source}: images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[3] != 3:
            raise DataError(
                f"{self.source}: images must have shape (N, H, W, 3) (RGB), got {images.shape}"
            )
        if images.shape[1] < 1 or images.shape[2] < 1:
            raise DataError(f"{self.source}: images have no pixels: shape {images.shape}")
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{self.source}: labels must be a 1-D integer array, "
                f"got dtype {labels.dtype} shape {labels.shape}"
            )
        if len(labels) != len(images):
            raise DataError(f"{self.source}: {len(images)} images but {len(labels)} labels")
        names = tuple(self.class_names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"{self.source}: class_names must be non-empty strings, got {names}")
        if len(set(names)) != len(names):
            raise DataError(f"{self.source}: class_names contain duplicates: {names}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(
                f"{self.source}: labels must be in [0, {len(names)}) for {len(names)} classes, "
                f"found values from {labels.min()} to {labels.max()}"
            )
        if not is_streamed(images):
            object.__setattr__(self, "images", np.ascontiguousarray(images))
        object.__setattr__(self, "labels", np.ascontiguousarray(labels, dtype=np.int64))
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "skipped", tuple(self.skipped))
        object.__setattr__(self, "groups", self._checked_groups())

    def _checked_groups(self) -> np.ndarray:
        """The group of every image: the given ids, or each image on its own; 32-bit where
        they fit (a streamed index's driver holds and sends this array)."""
        dtype = np.int32 if len(self.images) < 2**31 else np.int64
        if self.groups is None:
            return np.arange(len(self.images), dtype=dtype)
        groups = np.asarray(self.groups)
        if groups.shape != (len(self.images),) or not np.issubdtype(groups.dtype, np.integer):
            raise DataError(
                f"{self.source}: groups must be a 1-D integer array with one id per image, "
                f"got dtype {groups.dtype} shape {groups.shape}"
            )
        return np.ascontiguousarray(groups, dtype=dtype)

    @property
    def group_ids(self) -> np.ndarray:
        """:attr:`groups`, typed as the array it always is after construction."""
        assert self.groups is not None
        return self.groups

    @cached_property
    def duplicates(self) -> int:
        """How many images are byte-identical copies of another image's file in their class."""
        return len(self) - len(np.unique(self.group_ids))

    @cached_property
    def fingerprint(self) -> str:
        """Content hash (shape, pixels, labels, class names), so identical data is provable."""
        digest = hashlib.sha256()
        digest.update(repr(tuple(int(d) for d in self.images.shape)).encode())
        if isinstance(self.images, StreamedImages):  # the files' digests, taken when indexed
            digest.update(b"streamed" + self.images.digests.tobytes())
        else:
            digest.update(self.images.data.cast("B"))
        digest.update(self.labels.astype("<i8", copy=False).tobytes())
        digest.update(json.dumps(list(self.class_names)).encode())
        if self.duplicates:  # the groups decide the splits; without copies they are trivial
            digest.update(self.group_ids.astype("<i8", copy=False).tobytes())
        return digest.hexdigest()[:16]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, 3)`` of every image."""
        height, width, channels = self.images.shape[1:]
        return int(height), int(width), int(channels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageData(n={len(self)}, shape={self.image_shape}, "
            f"classes={len(self.class_names)}, source={self.source!r}, "
            f"skipped={len(self.skipped)})"
        )

    def subset(self, indices: np.ndarray) -> ImageData:
        """The images at ``indices`` (a copy), with the same classes, source and skipped list."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            raise DataError("subset expects integer indices, not a boolean mask")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"subset indices out of range for {len(self)} images")
        return ImageData(
            images=rows_of(self.images, idx),
            labels=self.labels[idx],
            class_names=self.class_names,
            source=self.source,
            skipped=self.skipped,
            groups=self.group_ids[idx],
            note=self.note,
        )

    def class_counts(self) -> dict[str, int]:
        """Images per class, in class order (classes with no images are listed with 0)."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def to_arrow(self) -> pa.Table:
        """A zero-copy Arrow table (raw pixels as fixed-size binary) for Ray and Parquet."""
        if self.streamed:
            raise DataError(f"{self.source}: streamed images are not held in memory to convert")
        n, height, width, _ = self.images.shape
        width_bytes = height * width * 3
        image_col = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width_bytes), n, [None, pa.py_buffer(self.images)]
        )
        metadata = {
            "class_names": json.dumps(list(self.class_names)),
            "height": str(height),
            "width": str(width),
            "fingerprint": self.fingerprint,
        }
        fields = [pa.field("image", pa.binary(width_bytes)), pa.field("label", pa.int64())]
        columns = [image_col, pa.array(self.labels, pa.int64())]
        if self.duplicates:  # a "group" column only when some images are copies
            fields.append(pa.field("group", pa.int64()))
            columns.append(pa.array(self.group_ids, pa.int64()))
        return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=metadata))

    @classmethod
    def from_arrow(cls, table: pa.Table, source: str) -> ImageData:
        """Rebuild from :meth:`to_arrow` output; a fingerprint mismatch means corrupted data."""
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        for key in ("class_names", "height", "width"):
            if key not in meta:
                raise DataError(f"{source}: Arrow table has no schema metadata key {key!r}")
        for column in ("image", "label"):
            if column not in table.column_names:
                raise DataError(f"{source}: Arrow table has no column {column!r}")
        try:
            class_names = tuple(json.loads(meta["class_names"]))
            height, width = int(meta["height"]), int(meta["width"])
        except (ValueError, TypeError) as exc:
            raise DataError(f"{source}: bad Arrow schema metadata ({exc})") from exc
        image_col = table.column("image")
        label_col = table.column("label")
        if image_col.null_count or label_col.null_count:
            raise DataError(f"{source}: Arrow table has missing (null) images or labels")
        pixels = _arrow_pixels(image_col, height, width, source)
        groups = table.column("group") if "group" in table.column_names else None
        data = cls(
            images=pixels.reshape(table.num_rows, height, width, 3),
            labels=label_col.to_numpy().astype(np.int64),
            class_names=class_names,
            source=source,
            groups=None if groups is None else groups.to_numpy().astype(np.int64),
        )
        expected = meta.get("fingerprint")
        if expected and data.fingerprint != expected:
            raise DataError(
                f"{source}: data fingerprint {data.fingerprint} does not match the one recorded "
                f"when the table was written ({expected}); the data was altered or corrupted"
            )
        return data


def _arrow_pixels(image_col: pa.ChunkedArray, height: int, width: int, source: str) -> np.ndarray:
    """The raw pixels of an Arrow image column (fixed-size or variable binary), flat."""
    n = len(image_col)
    row_bytes = height * width * 3
    if pa.types.is_fixed_size_binary(image_col.type):
        if image_col.type.byte_width != row_bytes:
            raise DataError(
                f"{source}: image column holds {image_col.type.byte_width} bytes per row, "
                f"expected {height}x{width}x3 = {row_bytes}"
            )
        pixels = np.empty(n * row_bytes, dtype=np.uint8)
        pos = 0
        for chunk in image_col.chunks:
            buf = chunk.buffers()[1]
            count = len(chunk) * row_bytes
            start = chunk.offset * row_bytes
            pixels[pos : pos + count] = np.frombuffer(buf, np.uint8, count, start)
            pos += count
        return pixels
    values = image_col.to_pylist()
    if any(len(v) != row_bytes for v in values):
        raise DataError(f"{source}: every image must hold {height}x{width}x3 = {row_bytes} bytes")
    return np.frombuffer(b"".join(values), dtype=np.uint8).copy()
