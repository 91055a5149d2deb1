"""Look at a data source before training on it, and turn image folders into Parquet shards.

``inspect_source`` decodes every file (it never stops at the first bad one) so that a user
sees all unreadable files, per class, in one report. ``convert_imagefolder`` writes the
original encoded bytes as Parquet shards, each written atomically, with a manifest written
last so that a crashed conversion is detected instead of silently loading part of the data.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytl.data.dataset import DataError, SkippedFile
from raytl.data.images import DEFAULT_MAX_PIXELS, UnreadableImage, decode_image
from raytl.data.sources import (
    CONVERTED_MARKER,
    MANIFEST_NAME,
    SOURCES,
    DecodeTask,
    folder_tasks,
    load_data,
    ordered_map,
    parquet_tasks,
    scan_imagefolder,
    scan_parquet,
    warn_ignored,
    warn_skipped,
)

_VALIDATE_SIZE = 32
"""Decode size used to validate files during conversion (JPEG draft mode makes it cheap)."""


@dataclass
class InspectReport:
    """What a data source holds: readable images per class, and every file that is not usable.

    Attributes:
        source: Description of the source (folder path or dataset name).
        class_counts: Readable images per class, in class order.
        skipped: Every unreadable file with its reason.
        skipped_per_class: Unreadable files per class (classes without any are omitted).
        total: Number of readable images.
        image_shape: ``(H, W, 3)`` if all images have one size, else None (see ``size_range``).
        size_range: Smallest and largest ``(H, W)`` by area, for files of varying size.
        ignored: Files that were not considered (not images, or outside class folders).
        problems: Layout problems that would stop training (e.g. an empty class folder).
    """

    source: str
    class_counts: dict[str, int]
    skipped: list[SkippedFile] = field(default_factory=list)
    skipped_per_class: dict[str, int] = field(default_factory=dict)
    total: int = 0
    image_shape: tuple[int, int, int] | None = None
    size_range: tuple[tuple[int, int], tuple[int, int]] | None = None
    ignored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A readable multi-line report listing every class and every unreadable file."""
        lines = [f"Source: {self.source}", f"Classes: {len(self.class_counts)}"]
        width = max((len(name) for name in self.class_counts), default=0)
        digits = max((len(str(c)) for c in self.class_counts.values()), default=1)
        for name, count in self.class_counts.items():
            line = f"  {name:<{width}}  {count:>{digits}} image(s)"
            if self.skipped_per_class.get(name):
                line += f"  ({self.skipped_per_class[name]} unreadable, skipped)"
            lines.append(line)
        lines.append(
            f"Total: {self.total} readable image(s), {len(self.skipped)} unreadable file(s) skipped"
        )
        if self.image_shape is not None:
            h, w, c = self.image_shape
            lines.append(f"Image shape: {h}x{w}x{c} (HxWxC)")
        elif self.size_range is not None:
            (h0, w0), (h1, w1) = self.size_range
            lines.append(
                f"Image sizes vary from {h0}x{w0} to {h1}x{w1} (HxW); "
                "they are resized to data.image_size when loaded"
            )
        if self.skipped:
            lines.append(f"Unreadable files ({len(self.skipped)}):")
            lines.extend(f"  {s.path}: {s.reason}" for s in self.skipped)
        if self.ignored:
            lines.append(f"Ignored files, not images inside a class folder ({len(self.ignored)}):")
            lines.extend(f"  {p}" for p in self.ignored)
        if self.problems:
            lines.append("Problems:")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def inspect_source(
    source: str, *, path: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> InspectReport:
    """Report classes, counts and every unreadable file of a source, without stopping early.

    Raises:
        DataError: Unknown source, or a path that cannot be inspected at all.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    if source == "imagefolder":
        scan = scan_imagefolder(path, strict=False)
        report = _inspect_tasks(folder_tasks(scan), scan.class_names, str(scan.root), max_pixels)
        report.ignored = [str(p) for p in scan.ignored]
        if len(scan.class_names) < 2:
            report.problems.append("only one class folder: classification needs at least 2")
        return report
    if source == "parquet":
        shards = scan_parquet(path)
        return _inspect_tasks(parquet_tasks(shards), shards.class_names, shards.source, max_pixels)
    data = load_data(source, path=path, max_pixels=max_pixels)
    return InspectReport(
        source=data.source,
        class_counts=data.class_counts(),
        total=len(data),
        image_shape=data.image_shape,
    )


def _inspect_tasks(
    tasks: list[DecodeTask], class_names: tuple[str, ...], source: str, max_pixels: int
) -> InspectReport:
    """Decode every task at full size, counting readable images and collecting failures."""

    def probe(task: DecodeTask) -> tuple[int, int] | SkippedFile:
        try:
            data = task.read()
        except OSError as exc:
            return SkippedFile(task.name, f"cannot read file ({type(exc).__name__}: {exc})")
        try:
            height, width = decode_image(data, size=None, max_pixels=max_pixels).shape[:2]
        except UnreadableImage as exc:
            return SkippedFile(task.name, exc.reason)
        return height, width

    readable: Counter[int] = Counter()
    bad: Counter[int] = Counter()
    skipped: list[SkippedFile] = []
    sizes: set[tuple[int, int]] = set()
    for task, result in zip(tasks, ordered_map(probe, tasks), strict=True):
        if isinstance(result, SkippedFile):
            skipped.append(result)
            bad[task.label] += 1
        else:
            readable[task.label] += 1
            sizes.add(result)
    problems = [
        f"class {name!r} has no readable images"
        for label, name in enumerate(class_names)
        if not readable[label]
    ]
    by_area = sorted(sizes, key=lambda hw: (hw[0] * hw[1], hw))
    return InspectReport(
        source=source,
        class_counts={name: readable[label] for label, name in enumerate(class_names)},
        skipped=skipped,
        skipped_per_class={
            name: bad[label] for label, name in enumerate(class_names) if bad[label]
        },
        total=sum(readable.values()),
        image_shape=(*by_area[0], 3) if len(sizes) == 1 else None,
        size_range=(by_area[0], by_area[-1]) if sizes else None,
        problems=problems,
    )


def convert_imagefolder(
    src: str,
    out_dir: str,
    *,
    shard_size: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[str]:
    """Write an image folder as Parquet shards of the original encoded bytes.

    Every file is decoded once to validate it; unreadable ones are skipped with the same
    warning as loading. Shards are ``part-00000.parquet``, ... (columns ``image`` binary,
    ``label`` int64, ``path`` relative string; metadata ``class_names``), each written to a
    hidden temporary file and renamed, and ``_raytl_manifest.json`` is written last. On any
    failure the shards written so far are removed, so ``out_dir`` is never left half-done.

    Returns:
        The paths of the written shards.

    Raises:
        DataError: Bad image folder, ``out_dir`` already holding shards, no readable images,
            or a class left without readable images.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard_size must be a positive integer, got {shard_size!r}")
    scan = scan_imagefolder(src)
    warn_ignored(scan)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.glob("*.parquet")) + (
        [MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else []
    )
    if existing:
        raise DataError(
            f"output folder {out} already holds {', '.join(existing[:5])}; "
            "convert into an empty folder (or delete those files) so shards are never mixed"
        )

    metadata = {"class_names": json.dumps(list(scan.class_names)), CONVERTED_MARKER: "1"}
    schema = pa.schema(
        [
            pa.field("image", pa.binary()),
            pa.field("label", pa.int64()),
            pa.field("path", pa.string()),
        ],
        metadata=metadata,
    )

    def validate(task: DecodeTask) -> bytes | SkippedFile:
        try:
            data = task.read()
        except OSError as exc:
            return SkippedFile(task.name, f"cannot read file ({type(exc).__name__}: {exc})")
        try:
            decode_image(data, size=_VALIDATE_SIZE, max_pixels=max_pixels)
        except UnreadableImage as exc:
            return SkippedFile(task.name, exc.reason)
        return data

    tasks = folder_tasks(scan)
    written: list[Path] = []
    shard_rows: list[int] = []
    skipped: list[SkippedFile] = []
    skipped_labels: list[int] = []
    kept_per_class = np.zeros(len(scan.class_names), dtype=np.int64)
    buffer: tuple[list[bytes], list[int], list[str]] = ([], [], [])

    def flush() -> None:
        images, labels, paths = buffer
        if not images:
            return
        table = pa.Table.from_arrays(
            [pa.array(images, pa.binary()), pa.array(labels, pa.int64()), pa.array(paths)],
            schema=schema,
        )
        target = out / f"part-{len(written):05d}.parquet"
        _write_atomic(target, lambda tmp: pq.write_table(table, tmp))
        written.append(target)
        shard_rows.append(len(images))
        for column in buffer:
            column.clear()

    try:
        for task, file, result in zip(tasks, scan.files, ordered_map(validate, tasks), strict=True):
            if isinstance(result, SkippedFile):
                skipped.append(result)
                skipped_labels.append(task.label)
                continue
            buffer[0].append(result)
            buffer[1].append(task.label)
            buffer[2].append(file.relative_to(scan.root).as_posix())
            kept_per_class[task.label] += 1
            if len(buffer[0]) >= shard_size:
                flush()
        flush()
        if not written:
            raise DataError(
                f"no readable images in {scan.root}: all {len(tasks)} files failed to decode"
            )
        empty = [n for n, k in zip(scan.class_names, kept_per_class, strict=True) if k == 0]
        if empty:
            raise DataError(
                f"{scan.root}: class(es) {', '.join(map(repr, empty))} have no readable images"
            )
        manifest = {
            "format": "raytl-imagefolder-shards",
            "version": 1,
            "source": str(scan.root),
            "class_names": list(scan.class_names),
            "rows": int(sum(shard_rows)),
            "shards": [
                {"file": p.name, "rows": rows} for p, rows in zip(written, shard_rows, strict=True)
            ],
            "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        }
        text = json.dumps(manifest, indent=2)
        _write_atomic(out / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if skipped:
        warn_skipped(skipped, skipped_labels, scan.class_names, str(scan.root))
    return [str(p) for p in written]


def _write_atomic(target: Path, write: Callable[[str], object]) -> None:
    """Write via a hidden temporary file in the same folder, fsync, then rename into place."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
