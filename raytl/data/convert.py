"""Turn an image folder into Parquet shards of the original encoded bytes.

Shards are each written atomically (temporary file, fsync, rename; on an object store a
temporary key, then a move), and a manifest is written last, so that a crashed conversion is
detected instead of silently loading part of the data: the ``parquet`` source refuses converted
shards without their manifest. The output may be a local folder or a pyarrow filesystem URI
(``s3://bucket/prefix``), written through :class:`raytl.storage.Storage`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytl.data.dataset import DataError, SkippedFile
from raytl.data.images import DEFAULT_MAX_PIXELS, UnreadableImage, decode_image
from raytl.data.sources.decode import (
    DECODE_BUDGET,
    DecodeTask,
    ordered_map,
    read_task,
    warn_skipped,
)
from raytl.data.sources.imagefolder import FolderScan, folder_tasks, scan_imagefolder, warn_ignored
from raytl.data.sources.shards import CONVERTED_MARKER, MANIFEST_NAME
from raytl.errors import first_line
from raytl.storage import Storage, is_uri, shown_location

_VALIDATE_SIZE = 32
"""Decode size used to validate files during conversion (JPEG draft mode makes it cheap)."""


def printable_path(path: str) -> str:
    """A file name as UTF-8 text, its non-UTF-8 bytes written as ``\\xe9`` (a Parquet string
    column and JSON hold only valid UTF-8; a name from a Latin-1 disk is not)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def convert_imagefolder(
    src: str,
    out_dir: str,
    *,
    shard_size: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shuffle_seed: int | None = 0,
) -> list[str]:
    """Write an image folder as Parquet shards of the original encoded bytes, in a seeded random
    order (``shuffle_seed``; None keeps the folder's) so that every row group mixes the classes
    (a streamed epoch reads a few row groups together; the ``path`` column keeps each origin).

    Every file is decoded once to validate it; unreadable ones are skipped with the same
    warning as loading. Shards are ``part-00000.parquet``, ... (columns ``image`` binary,
    ``label`` int64, ``path`` relative string; metadata ``class_names``), each written to a
    hidden temporary file and renamed, and ``_raytl_manifest.json`` is written last. On any
    failure the shards written so far are removed, so ``out_dir`` is never left half-done.

    Returns:
        The written shards, as paths or URIs like ``out_dir``.

    Raises:
        DataError: Bad image folder, ``out_dir`` already holding shards, no readable images,
            or a class left without readable images.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard_size must be a positive integer, got {shard_size!r}")
    scan = scan_imagefolder(src)
    warn_ignored(scan)
    out = _empty_output_folder(out_dir)
    writer = _ShardWriter(out, _shard_schema(scan.class_names), shard_size)
    tasks = folder_tasks(scan)
    if shuffle_seed is not None:  # one class per row group would make one-class batches
        tasks = [tasks[i] for i in np.random.default_rng(shuffle_seed).permutation(len(tasks))]
    skipped: list[SkippedFile] = []
    skipped_labels: list[int] = []
    kept_per_class = np.zeros(len(scan.class_names), dtype=np.int64)
    results = ordered_map(partial(_validate, max_pixels=max_pixels), tasks)
    try:
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, SkippedFile):
                skipped.append(result)
                skipped_labels.append(task.label)
                continue
            # a string, not a Path: pathlib interns every name it parses, for good
            writer.add(result, task.label, os.path.relpath(task.name, scan.root))
            kept_per_class[task.label] += 1
        writer.flush()
        _check_kept(scan, kept_per_class)
        _write_manifest(out, scan, writer, skipped)
    except BaseException:
        writer.remove_all()
        raise
    if skipped:
        warn_skipped(skipped, skipped_labels, scan.class_names, str(scan.root))
    return [out.uri_of(name) for name in writer.written]


def _check_kept(scan: FolderScan, kept_per_class: np.ndarray) -> None:
    """Refuse a conversion that kept no image, or none of some class."""
    if not kept_per_class.any():
        raise DataError(
            f"no readable images in {scan.root}: all {len(scan.labels) + len(scan.refused)} files "
            "failed to decode"
        )
    empty = [n for n, k in zip(scan.class_names, kept_per_class, strict=True) if k == 0]
    if empty:
        raise DataError(
            f"{scan.root}: class(es) {', '.join(map(repr, empty))} have no readable images"
        )


def _empty_output_folder(out_dir: str) -> Storage:
    """Create ``out_dir`` if needed; refuse one that already holds shards or a manifest.

    Raises:
        DataError: ``out_dir`` is a file, already holds shards (so they would be mixed), or
            cannot be reached (a URI whose server or credentials fail).
    """
    location = out_dir if is_uri(out_dir) else os.path.expanduser(out_dir)
    shown = shown_location(location)
    try:
        out = Storage(location)
        kind = out.fs.get_file_info(out.root).type
        if kind == pafs.FileType.File:
            raise DataError(f"output {shown} exists and is not a directory")
        out.makedirs()
        names = [i.base_name for i in out.fs.get_file_info(pafs.FileSelector(out.root))]
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot write to {shown}: {first_line(exc)}") from None
    existing = sorted(n for n in names if n.endswith(".parquet")) + (
        [MANIFEST_NAME] if MANIFEST_NAME in names else []
    )
    if existing:
        raise DataError(
            f"output folder {shown} already holds {', '.join(existing[:5])}; "
            "convert into an empty folder (or delete those files) so shards are never mixed"
        )
    return out


def _shard_schema(class_names: Sequence[str]) -> pa.Schema:
    """The shards' columns, with the class names and the converted marker as metadata."""
    metadata = {"class_names": json.dumps(list(class_names)), CONVERTED_MARKER: "1"}
    return pa.schema(
        [
            pa.field("image", pa.binary()),
            pa.field("label", pa.int64()),
            pa.field("path", pa.string()),
        ],
        metadata=metadata,
    )


def _validate(task: DecodeTask, *, max_pixels: int) -> bytes | SkippedFile:
    """The file's bytes if they decode (at a small size, cheaply), else why they do not."""
    data = read_task(task)
    if isinstance(data, SkippedFile):
        return data
    try:
        decode_image(data, size=_VALIDATE_SIZE, max_pixels=max_pixels, budget=DECODE_BUDGET)
    except UnreadableImage as exc:
        return SkippedFile(task.name, exc.reason)
    return data


ROW_GROUP_ROWS = 256
"""Rows per Parquet row group: a streamed epoch reads a shard one row group at a time
(:class:`raytl.data.stream.ShardRows`), so groups are kept small enough to cache a few."""


class _ShardWriter:
    """Buffers rows and writes every ``shard_size`` of them as the next numbered shard."""

    def __init__(self, out: Storage, schema: pa.Schema, shard_size: int) -> None:
        self.out = out
        self.schema = schema
        self.shard_size = shard_size
        self.written: list[str] = []  # shard names, in the output folder
        self.rows: list[int] = []
        self._images: list[bytes] = []
        self._labels: list[int] = []
        self._paths: list[str] = []

    def add(self, image: bytes, label: int, path: str) -> None:
        """Buffer one row, writing a shard when the buffer is full."""
        self._images.append(image)
        self._labels.append(label)
        self._paths.append(printable_path(path))
        if len(self._images) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (if any) as ``part-NNNNN.parquet``, atomically."""
        if not self._images:
            return
        table = pa.Table.from_arrays(
            [
                pa.array(self._images, pa.binary()),
                pa.array(self._labels, pa.int64()),
                pa.array(self._paths),
            ],
            schema=self.schema,
        )
        name = f"part-{len(self.written):05d}.parquet"
        self.out.write(name, lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS))
        self.written.append(name)
        self.rows.append(len(self._images))
        for column in (self._images, self._labels, self._paths):
            column.clear()

    def remove_all(self) -> None:
        """Delete every shard written so far (after a failure)."""
        for name in self.written:
            with contextlib.suppress(OSError):
                self.out.fs.delete_file(self.out.path(name))


def _write_manifest(
    out: Storage, scan: FolderScan, writer: _ShardWriter, skipped: Sequence[SkippedFile]
) -> None:
    """Write the manifest last: it lists every shard, so its presence proves completion."""
    manifest = {
        "format": "raytl-imagefolder-shards",
        "version": 1,
        "source": str(scan.root),
        "class_names": list(scan.class_names),
        "rows": int(sum(writer.rows)),
        "shards": [
            {"file": name, "rows": rows}
            for name, rows in zip(writer.written, writer.rows, strict=True)
        ],
        "skipped": [{"path": printable_path(s.path), "reason": s.reason} for s in skipped],
    }
    text = json.dumps(manifest, indent=2)
    out.write(MANIFEST_NAME, text)
