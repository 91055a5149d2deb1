"""Parquet shards found and checked: the files of a folder (local or a pyarrow URI), the
columns and class names each declares, and, for a folder written by ``convert_imagefolder``,
its manifest (a half-finished or mixed conversion is refused). Every shard's footer is read here,
once; :mod:`raytl.data.sources.parquet` reads the rows with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytl.data.dataset import DataError
from raytl.errors import first_line
from raytl.storage import Storage, is_uri, shown_location

MANIFEST_NAME = "_raytl_manifest.json"
"""Written last by ``convert_imagefolder``: its presence proves the conversion finished."""
CONVERTED_MARKER = "raytl_converted"
"""Schema metadata key on shards written by ``convert_imagefolder``."""


@dataclass(frozen=True)
class ParquetShards:
    """Validated Parquet shards: their files (paths on ``fs``), the class names they agree on,
    and each file's footer, read once when the shards are scanned: on a bucket every footer read
    is requests (benchmarks/s3_requests.py), so the loads open the files with it."""

    files: tuple[str, ...]
    class_names: tuple[str, ...]
    source: str  # the folder or file as the user named it (a URI's query left out)
    fs: pafs.FileSystem
    uri_prefix: str = ""  # "s3://" for a URI source: a file's name in messages is prefix + path
    footers: tuple[pq.FileMetaData, ...] = ()  # one per file

    def name(self, file: str) -> str:
        """How messages name ``file``: its local path, or its URI without the query."""
        return self.uri_prefix + file


def scan_parquet(path: str | os.PathLike[str] | None) -> ParquetShards:
    """Find and validate the shards (columns, metadata, completeness) without reading images.

    Raises:
        DataError: Missing path or shards, a storage that cannot be reached (naming the URI), a
            missing column or metadata key (naming the file and the key), shards that disagree
            on class names, or an unfinished conversion.
    """
    if path is None:
        raise DataError(
            "the parquet source needs data.path: a folder of *.parquet shards or one file"
        )
    text = str(path)
    location = text if is_uri(text) else os.path.expanduser(text)
    shown = shown_location(location)
    try:
        storage = Storage(location)
        kind = storage.fs.get_file_info(storage.root).type
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"parquet path {shown} cannot be read: {first_line(exc)}") from None
    if kind == pafs.FileType.NotFound:
        raise DataError(f"parquet path {shown} does not exist")
    prefix = shown.partition("://")[0] + "://" if is_uri(location) else ""
    shards = ParquetShards((), (), shown, storage.fs, prefix)
    files = _shard_files(storage, shards) if kind == pafs.FileType.Directory else (storage.root,)
    class_names: tuple[str, ...] | None = None
    converted = False
    footers = []
    for file in files:
        footers.append(_read_footer(file, shards))
        names, marked = _check_shard_schema(footers[-1].schema.to_arrow_schema(), file, shards)
        if class_names is None:
            class_names = tuple(names)
        elif tuple(names) != class_names:
            raise DataError(
                f"{shards.name(file)}: class_names {names} differ from those of "
                f"{shards.name(files[0])} ({list(class_names)})"
            )
        converted = converted or marked
    assert class_names is not None
    shards = ParquetShards(files, class_names, shown, storage.fs, prefix, tuple(footers))
    if kind == pafs.FileType.Directory:
        _check_manifest(storage, shards, converted)
    return shards


def _shard_files(storage: Storage, shards: ParquetShards) -> tuple[str, ...]:
    """The visible ``*.parquet`` files of the folder, sorted."""
    try:
        infos = storage.fs.get_file_info(pafs.FileSelector(storage.root))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot list {shards.source}: {first_line(exc)}") from None
    files = tuple(
        sorted(
            info.path
            for info in infos
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".parquet")
            and not info.base_name.startswith((".", "_"))
        )
    )
    if not files:
        raise DataError(f"no *.parquet files in {shards.source}")
    return files


def _read_footer(path: str, shards: ParquetShards) -> pq.FileMetaData:
    """One shard's footer (its schema, row groups and their sizes).

    Raises:
        DataError: The file is not a readable Parquet file.
    """
    try:
        return pq.read_metadata(path, filesystem=shards.fs)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(
            f"{shards.name(path)} is not a readable Parquet file ({first_line(exc)})"
        ) from None


def _check_shard_schema(
    schema: pa.Schema, path: str, shards: ParquetShards
) -> tuple[list[str], bool]:
    """Validate one shard's columns and metadata; its class names and whether we wrote it.

    Raises:
        DataError: A missing or mistyped column, or bad ``class_names``.
    """
    file = shards.name(path)
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


def _check_manifest(storage: Storage, shards: ParquetShards, converted: bool) -> None:
    """Refuse a half-finished or mixed conversion instead of silently training on part of it."""
    root, manifest_name = shards.source, shards.name(storage.path(MANIFEST_NAME))
    if not storage.is_file(MANIFEST_NAME):
        if converted:
            raise DataError(
                f"{root} holds shards from convert_imagefolder but no {MANIFEST_NAME}: the "
                "conversion did not finish; run it again into an empty folder"
            )
        return
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST_NAME))
        listed = {entry["file"]: int(entry["rows"]) for entry in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_name} is unreadable ({exc}); run the conversion again") from exc
    present = {f.rpartition("/")[2]: f for f in shards.files}
    missing = sorted(set(listed) - set(present))
    extra = sorted(set(present) - set(listed))
    if missing:
        raise DataError(
            f"{root}: shard(s) listed in {MANIFEST_NAME} are missing: {', '.join(missing)}"
        )
    if extra:
        raise DataError(
            f"{root}: shard(s) not listed in {MANIFEST_NAME} (left from another conversion?): "
            f"{', '.join(extra)}"
        )
    rows_of = {
        file: footer.num_rows for file, footer in zip(shards.files, shards.footers, strict=True)
    }
    for name, file in present.items():
        rows = rows_of[file]
        if rows != listed[name]:
            raise DataError(
                f"{shards.name(file)} has {rows} rows but {MANIFEST_NAME} says {listed[name]}; "
                "the shard was altered or truncated"
            )
