"""The ``parquet`` source: shards of encoded images, as written by ``convert_imagefolder``.

Each shard has a binary ``image`` column (the encoded file bytes), an integer ``label``
column and a JSON list ``class_names`` in its schema metadata; :mod:`raytl.data.sources.shards`
finds and checks them (and the manifest of a conversion) first, reading each footer once.

The shards may be a local folder or any pyarrow filesystem URI (``s3://bucket/prefix``, with
``?endpoint_override=...`` for an S3-compatible server; ``gs://``): they are listed and read
through :class:`raytl.storage.Storage`, and named in messages by their URI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytl.data.dataset import DataError, ImageData
from raytl.data.images import DEFAULT_MAX_PIXELS
from raytl.data.sources.decode import DecodeTask, decode_tasks, index_tasks
from raytl.data.sources.shards import ParquetShards, scan_parquet
from raytl.data.splits import stratified_indices
from raytl.data.stream import ShardRows, choose_mode
from raytl.errors import first_line


@dataclass(frozen=True)
class ChosenRows:
    """Every row's label (over all shards, in order), where each shard starts in it, its row
    groups' sizes, and the rows chosen (all, or a stratified sample), sorted."""

    starts: np.ndarray  # int64, one more than the shards: shard i is rows starts[i]:starts[i+1]
    group_rows: list[list[int]]  # per shard, the rows of each of its row groups
    labels: np.ndarray
    rows: np.ndarray

    def of_shard(self, shard: int) -> np.ndarray:
        """The chosen rows of shard ``shard``, as rows of that shard."""
        start, end = self.starts[shard], self.starts[shard + 1]
        low, high = np.searchsorted(self.rows, (start, end))
        return self.rows[low:high] - start


def chosen_rows(shards: ParquetShards, limit: int | None, seed: int) -> ChosenRows:
    """The rows to use: all, or a stratified sample of ``limit`` (the labels are read first, a
    small column)."""
    per_shard, group_rows = [], []
    for shard, file in enumerate(shards.files):
        with _reader(shards, shard) as reader:
            per_shard.append(_shard_labels(reader, shards.name(file), shards.class_names))
            metadata = reader.metadata
            group_rows.append(
                [metadata.row_group(g).num_rows for g in range(reader.num_row_groups)]
            )
    starts = np.cumsum([0] + [len(labels) for labels in per_shard], dtype=np.int64)
    labels = np.concatenate(per_shard)
    del per_shard
    rows = np.arange(len(labels)) if limit is None else stratified_indices(labels, limit, seed=seed)
    return ChosenRows(starts, group_rows, labels, rows)


def stream_parquet(shards: ParquetShards, chosen: ChosenRows, **options: Any) -> ImageData:
    """The streamed ImageData of the chosen rows: each row group is read once to check and
    digest its chosen rows (one group in memory at a time, by ``ParquetFile.read_row_group`` as
    the stream reads them: a dataset scan of each group kept memory that grew with the groups
    read); the index keeps where they are."""
    row_groups: list[tuple[int, int]] = []  # (shard, row group) of each group read
    largest = max((size for sizes in chosen.group_rows for size in sizes), default=0)
    block = np.empty(len(chosen.rows), dtype=np.int32)  # per row: its group in row_groups
    within = np.empty(len(chosen.rows), dtype=np.int32 if largest < 2**31 else np.int64)
    filled = 0  # rows of `block` and `within` filled so far, in task order

    def tasks() -> Iterator[DecodeTask]:
        nonlocal filled
        for shard, file in enumerate(shards.files):
            mine, start, name = chosen.of_shard(shard), int(chosen.starts[shard]), shards.name(file)
            if not len(mine):
                continue
            with _reader(shards, shard) as reader:
                group_start = 0
                for group, size in enumerate(chosen.group_rows[shard]):
                    low, high = np.searchsorted(mine, (group_start, group_start + size))
                    local = mine[low:high] - group_start
                    if len(local):
                        row_groups.append((shard, group))
                        blobs = _read_column(reader, "image", name, group).take(local).to_pylist()
                        for row, blob in zip(local.tolist(), blobs, strict=True):
                            block[filled], within[filled] = len(row_groups) - 1, row
                            filled += 1
                            label = int(chosen.labels[start + group_start + row])
                            yield DecodeTask(
                                f"{name}#row={group_start + row}", label, _in_memory(blob or b"")
                            )
                    group_start += size

    def index(kept: np.ndarray) -> ShardRows:
        everything = kept.all()
        return ShardRows(
            shards.files,
            shards.fs,
            np.array(row_groups, dtype=np.int32).reshape(-1, 2),
            block if everything else block[kept],
            within if everything else within[kept],
            shards.uri_prefix,
        )

    all_rows = len(chosen.rows) == len(chosen.labels)  # every row, in order: no copy
    labels = chosen.labels if all_rows else chosen.labels[chosen.rows]
    return index_tasks(
        tasks(),
        len(chosen.rows),
        index,
        class_names=shards.class_names,
        source=shards.source,
        labels=labels,
        **options,
    )


def parquet_tasks(
    shards: ParquetShards, limit: int | None = None, seed: int = 0
) -> list[DecodeTask]:
    """One decode task per row, named ``shard.parquet#row=N``; bad labels raise DataError.

    The labels are read first (a small column); with ``limit``, a stratified sample of the rows
    is chosen on them, and only those rows' image bytes are kept, one shard read at a time.
    """
    chosen = chosen_rows(shards, limit, seed)
    tasks: list[DecodeTask] = []
    for shard, file in enumerate(shards.files):
        rows = chosen.of_shard(shard)
        if not len(rows):
            continue
        name = shards.name(file)
        labels = chosen.labels[chosen.starts[shard] + rows]
        with _reader(shards, shard) as reader:
            images = _read_column(reader, "image", name).take(rows).to_pylist()
        for row, label, blob in zip(rows.tolist(), labels.tolist(), images, strict=True):
            tasks.append(DecodeTask(f"{name}#row={row}", label, _in_memory(blob or b"")))
    return tasks


def _reader(shards: ParquetShards, shard: int) -> pq.ParquetFile:
    """Shard number ``shard`` opened for reading with the footer read when it was scanned."""
    file = shards.files[shard]
    try:
        return pq.ParquetFile(file, filesystem=shards.fs, metadata=shards.footers[shard])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(
            f"{shards.name(file)} is not a readable Parquet file ({first_line(exc)})"
        ) from None


def _read_column(
    reader: pq.ParquetFile, column: str, name: str, group: int | None = None
) -> pa.ChunkedArray:
    """One column of a shard (or of one of its row groups); a damaged page (the footer read
    fine) is one clear line."""
    try:
        if group is None:
            return reader.read(columns=[column]).column(column)
        return reader.read_row_group(group, columns=[column]).column(column)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(
            f"{name}: a data page cannot be read ({first_line(exc)}); the "
            "shard is damaged: convert it again or remove it"
        ) from None


def _shard_labels(reader: pq.ParquetFile, name: str, class_names: tuple[str, ...]) -> np.ndarray:
    """A shard's labels, checked: none missing, each a class of ``class_names``."""
    labels = _read_column(reader, "label", name)
    if labels.null_count:
        row = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{name}#row={row}: label is missing (null)")
    values = labels.to_numpy().astype(np.int64)
    n_classes = len(class_names)
    bad = np.flatnonzero((values < 0) | (values >= n_classes))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{name}#row={row}: label {values[row]} is outside "
            f"[0, {n_classes}) for class_names {list(class_names)}"
        )
    return values


def _in_memory(data: bytes) -> Callable[[], bytes]:
    """A reader for bytes already in memory (a Parquet cell), for :class:`DecodeTask`."""
    return lambda: data


def load_parquet(
    *,
    path: str | None,
    image_size: int = 64,
    on_bad_file: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    seed: int = 0,
    mode: str = "memory",
) -> ImageData:
    """Load Parquet shards of encoded images (``image``, ``label``, metadata ``class_names``);
    with ``limit``, only a stratified sample of the rows is read and decoded. ``mode`` as for
    :func:`~raytl.data.sources.imagefolder.load_imagefolder`."""
    shards = scan_parquet(path)
    rows = sum(footer.num_rows for footer in shards.footers)
    mode, note = choose_mode(mode, min(rows, limit or rows), image_size)
    if mode == "stream":
        return stream_parquet(
            shards,
            chosen_rows(shards, limit, seed),
            image_size=image_size,
            on_bad_file=on_bad_file,
            max_pixels=max_pixels,
            note=note,
        )
    return decode_tasks(
        parquet_tasks(shards, limit, seed),
        class_names=shards.class_names,
        source=shards.source,
        image_size=image_size,
        on_bad_file=on_bad_file,
        max_pixels=max_pixels,
        note=note,
    )
