"""The ``parquet`` source: shards of encoded images, as written by ``convert_imagefolder``.

Each shard has a binary ``image`` column (the encoded file bytes), an integer ``label``
column and a JSON list ``class_names`` in its schema metadata. A folder of shards written by
``convert_imagefolder`` also holds :data:`MANIFEST_NAME`, checked so that a half-finished or
mixed conversion is refused instead of silently training on part of the data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from raytl.data.dataset import DataError, ImageData
from raytl.data.images import DEFAULT_MAX_PIXELS
from raytl.data.sources.decode import DecodeTask, decode_tasks

MANIFEST_NAME = "_raytl_manifest.json"
"""Written last by ``convert_imagefolder``: its presence proves the conversion finished."""
CONVERTED_MARKER = "raytl_converted"
"""Schema metadata key on shards written by ``convert_imagefolder``."""


@dataclass(frozen=True)
class ParquetShards:
    """Validated Parquet shards: their files and the class names they agree on."""

    files: tuple[Path, ...]
    class_names: tuple[str, ...]
    source: str


def scan_parquet(path: str | os.PathLike[str] | None) -> ParquetShards:
    """Find and validate the shards (columns, metadata, completeness) without reading images.

    Raises:
        DataError: Missing path or shards, a missing column or metadata key (naming the file
            and the key), shards that disagree on class names, or an unfinished conversion.
    """
    if path is None:
        raise DataError(
            "the parquet source needs data.path: a folder of *.parquet shards or one file"
        )
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"parquet path {root} does not exist")
    files = _shard_files(root)
    class_names: tuple[str, ...] | None = None
    converted = False
    for file in files:
        names, marked = _read_shard_schema(file)
        if class_names is None:
            class_names = tuple(names)
        elif tuple(names) != class_names:
            raise DataError(
                f"{file}: class_names {names} differ from those of {files[0]} ({list(class_names)})"
            )
        converted = converted or marked
    assert class_names is not None
    if root.is_dir():
        _check_manifest(root, files, converted)
    return ParquetShards(files=files, class_names=class_names, source=str(root))


def _shard_files(root: Path) -> tuple[Path, ...]:
    """The visible ``*.parquet`` files of a folder, sorted, or the one file ``root`` itself."""
    if not root.is_dir():
        return (root,)
    files = tuple(
        sorted(
            p for p in root.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_"))
        )
    )
    if not files:
        raise DataError(f"no *.parquet files in {root}")
    return files


def _read_shard_schema(file: Path) -> tuple[list[str], bool]:
    """Validate one shard's columns and metadata; its class names and whether we wrote it.

    Raises:
        DataError: Unreadable file, a missing or mistyped column, or bad ``class_names``.
    """
    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{file} is not a readable Parquet file ({exc})") from exc
    for column, expected in (("image", "binary: encoded image file bytes"), ("label", "int64")):
        if column not in schema.names:
            raise DataError(
                f"{file} has no column {column!r} ({expected}); "
                f"columns found: {', '.join(schema.names)}"
            )
    image_type, label_type = schema.field("image").type, schema.field("label").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise DataError(
            f"{file}: column 'image' must be binary (encoded image file bytes), got {image_type}"
        )
    if not pa.types.is_integer(label_type):
        raise DataError(f"{file}: column 'label' must be an integer type, got {label_type}")
    metadata = schema.metadata or {}
    if b"class_names" not in metadata:
        raise DataError(
            f"{file}: schema metadata has no key 'class_names' "
            "(expected a JSON list of class names, indexed by label)"
        )
    try:
        names = json.loads(metadata[b"class_names"])
    except ValueError as exc:
        raise DataError(f"{file}: schema metadata 'class_names' is not JSON ({exc})") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < 2:
        raise DataError(
            f"{file}: schema metadata 'class_names' must be a JSON list of at least 2 strings"
        )
    return names, CONVERTED_MARKER.encode() in metadata


def _check_manifest(root: Path, files: Sequence[Path], converted: bool) -> None:
    """Refuse a half-finished or mixed conversion instead of silently training on part of it."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        if converted:
            raise DataError(
                f"{root} holds shards from convert_imagefolder but no {MANIFEST_NAME}: the "
                "conversion did not finish; run it again into an empty folder"
            )
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = {entry["file"]: int(entry["rows"]) for entry in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_path} is unreadable ({exc}); run the conversion again") from exc
    present = {f.name for f in files}
    missing = sorted(set(listed) - present)
    extra = sorted(present - set(listed))
    if missing:
        raise DataError(
            f"{root}: shard(s) listed in {MANIFEST_NAME} are missing: {', '.join(missing)}"
        )
    if extra:
        raise DataError(
            f"{root}: shard(s) not listed in {MANIFEST_NAME} (left from another conversion?): "
            f"{', '.join(extra)}"
        )
    for file in files:
        rows = pq.read_metadata(file).num_rows
        if rows != listed[file.name]:
            raise DataError(
                f"{file} has {rows} rows but {MANIFEST_NAME} says {listed[file.name]}; "
                "the shard was altered or truncated"
            )


def parquet_tasks(shards: ParquetShards) -> list[DecodeTask]:
    """One decode task per row, named ``shard.parquet#row=N``; bad labels raise DataError."""
    dataset = ds.dataset([str(f) for f in shards.files], format="parquet")
    tasks: list[DecodeTask] = []
    n_classes = len(shards.class_names)
    for fragment in dataset.get_fragments():
        try:
            table = fragment.to_table(columns=["image", "label"])
        except (OSError, pa.ArrowException) as exc:  # a damaged page: the footer read fine
            raise DataError(
                f"{fragment.path}: a data page cannot be read ({str(exc).splitlines()[0]}); the "
                "shard is damaged: convert it again or remove it"
            ) from None
        labels = table.column("label")
        if labels.null_count:
            row = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{fragment.path}#row={row}: label is missing (null)")
        label_values = labels.to_numpy().astype(np.int64)
        bad = np.flatnonzero((label_values < 0) | (label_values >= n_classes))
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{fragment.path}#row={row}: label {label_values[row]} is outside "
                f"[0, {n_classes}) for class_names {list(shards.class_names)}"
            )
        for row, (blob, label) in enumerate(
            zip(table.column("image").to_pylist(), label_values, strict=True)
        ):
            tasks.append(
                DecodeTask(
                    name=f"{fragment.path}#row={row}",
                    label=int(label),
                    read=_in_memory(blob or b""),
                )
            )
    return tasks


def _in_memory(data: bytes) -> Callable[[], bytes]:
    """A reader for bytes already in memory (a Parquet cell), for :class:`DecodeTask`."""
    return lambda: data


def load_parquet(
    *,
    path: str | None,
    image_size: int = 64,
    on_bad_file: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageData:
    """Load Parquet shards of encoded images (``image``, ``label``, metadata ``class_names``)."""
    shards = scan_parquet(path)
    return decode_tasks(
        parquet_tasks(shards),
        class_names=shards.class_names,
        source=shards.source,
        image_size=image_size,
        on_bad_file=on_bad_file,
        max_pixels=max_pixels,
    )
