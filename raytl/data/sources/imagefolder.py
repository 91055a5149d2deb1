"""The ``imagefolder`` source: ``path/<class>/**/<image>``, one sub-folder per class.

:func:`scan_imagefolder` validates the layout and lists the files without decoding any, so
``inspect_source`` and ``convert_imagefolder`` see exactly the files that loading would use.
Links are followed only inside the folder (:mod:`.walk`); what is refused is reported like
an unreadable file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raytl.data.dataset import DataError, ImageData, SkippedFile
from raytl.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, is_image_path
from raytl.data.sources.decode import WARN_NAMES, DecodeTask, decode_tasks, index_tasks
from raytl.data.sources.walk import FolderWalk, path_at
from raytl.data.splits import stratified_indices
from raytl.data.stream import FileRows, choose_mode
from raytl.errors import first_line
from raytl.storage import Storage, is_uri, shown_location


@dataclass(frozen=True)
class FolderScan:
    """What an image folder holds, before any decoding: the files used, as paths relative to
    ``root`` (one Arrow binary array of file-system bytes: :func:`.walk.path_at`) and their
    labels.

    ``refused`` are files (or linked folders) found but not used, with the reason: links out
    of the folder, loops, a second path to a file already used; ``refused_labels`` their class.
    """

    root: Path
    class_names: tuple[str, ...]
    relative: pa.Array
    labels: np.ndarray
    ignored: tuple[Path, ...]
    refused: tuple[SkippedFile, ...] = ()
    refused_labels: tuple[int, ...] = ()

    @property
    def files(self) -> list[Path]:
        """The files used, as paths (one Python object each: for small folders and tests)."""
        return [self.root / os.fsdecode(name) for name in self.relative.to_pylist()]

    def all_labels(self) -> np.ndarray:
        """The labels of the files used, then of the refused ones (the order of the tasks)."""
        return np.concatenate([self.labels, np.asarray(self.refused_labels, dtype=np.int64)])

    def tasks(self, rows: Iterable[int] | None = None) -> Iterator[DecodeTask]:
        """Decode tasks, made one at a time, for ``rows`` (positions in :meth:`all_labels`;
        default all): each reads its file in the worker thread (I/O overlaps decoding); a
        refused file becomes a SkippedFile with its reason."""
        used, root = len(self.labels), str(self.root)
        for row in range(used + len(self.refused)) if rows is None else rows:
            if row < used:  # strings, not Paths: pathlib would intern every file name for good
                file = os.path.join(root, path_at(self.relative, row))
                yield DecodeTask(file, int(self.labels[row]), partial(read_file, file))
            else:
                skipped = self.refused[row - used]
                label = self.refused_labels[row - used]
                yield DecodeTask(skipped.path, label, bytes, refused=skipped.reason)


def scan_imagefolder(path: str | os.PathLike[str] | None, *, strict: bool = True) -> FolderScan:
    """List the classes and image files of ``path/<class>/**/<image>``, validating the layout.

    Hidden files and folders (name starting with ".") are skipped silently; other files that
    are not images, or that sit directly in ``path``, are returned in ``ignored``.

    Args:
        path: The image folder.
        strict: If False (for reports), empty class folders and a single class are allowed.

    Raises:
        DataError: Missing path or no class folders; if strict, also an empty class folder
            (named) or fewer than 2 classes.
    """
    if path is None:
        raise DataError(
            "the imagefolder source needs data.path: a folder with one sub-folder per class"
        )
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(
            f"image folder {root} is not a directory (expected one sub-folder per class)"
        )
    walk = FolderWalk(root, os.path.realpath(root))
    class_dirs = _class_folders(root, walk.ignored)
    for label, class_dir in enumerate(class_dirs):
        if not walk.walk_class(class_dir, label) and strict:
            raise DataError(
                f"class folder {class_dir} contains no image files "
                f"(expected {', '.join(sorted(IMAGE_EXTENSIONS))}, in any case)"
            )
    if len(class_dirs) < 2 and strict:
        raise DataError(
            f"image folder {root} has only one class folder ({class_dirs[0].name}); "
            "classification needs at least 2 classes"
        )
    class_names = tuple(d.name for d in class_dirs)
    used = walk.used_once(class_names)
    relative, labels = walk.relative(), walk.labels()
    if not used.all():
        relative, labels = relative.filter(pa.array(used)), labels[used]
    return FolderScan(
        root=root,
        class_names=class_names,
        relative=relative,
        labels=labels,
        ignored=tuple(walk.ignored),
        refused=tuple(skipped for skipped, _ in walk.refused),
        refused_labels=tuple(label for _, label in walk.refused),
    )


def _class_folders(root: Path, ignored: list[Path]) -> list[Path]:
    """The class folders of ``root`` by name; its other non-hidden files go to ``ignored``.

    Raises:
        DataError: ``root`` has no class folder.
    """
    class_dirs: list[Path] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        (class_dirs if entry.is_dir() else ignored).append(entry)
    if not class_dirs:
        raise DataError(
            f"no class folders in {root}: expected one sub-folder per class, "
            f"e.g. {root}/cat/001.jpg and {root}/dog/001.jpg"
        )
    return class_dirs


def read_file(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def warn_ignored(scan: FolderScan) -> None:
    """Say which non-image or misplaced files were not used, so nothing vanishes unnoticed."""
    if not scan.ignored:
        return
    shown = ", ".join(str(p.relative_to(scan.root)) for p in scan.ignored[:WARN_NAMES])
    more = len(scan.ignored) - WARN_NAMES
    warnings.warn(
        f"ignored {len(scan.ignored)} file(s) in {scan.root} that are not images inside a class "
        f"folder: {shown}" + (f", and {more} more" if more > 0 else ""),
        stacklevel=3,
    )


def folder_tasks(scan: FolderScan) -> list[DecodeTask]:
    """Every decode task of the folder (:meth:`FolderScan.tasks`), the refused files last."""
    return list(scan.tasks())


@dataclass(frozen=True)
class UriFolderScan:
    """An image folder on a pyarrow filesystem URI: ``<uri>/<class>/**/<image>``."""

    class_names: tuple[str, ...]
    files: tuple[str, ...]  # paths on fs
    labels: tuple[int, ...]
    fs: pafs.FileSystem
    source: str  # the URI without its query
    prefix: str  # "s3://": a file's name in messages is prefix + path

    def tasks(self) -> list[DecodeTask]:
        return [
            DecodeTask(self.prefix + file, label, partial(_read_uri, self.fs, file))
            for file, label in zip(self.files, self.labels, strict=True)
        ]


def _read_uri(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except pa.ArrowException as exc:  # read_task records OSErrors as skipped files
        raise OSError(str(exc)) from exc


def scan_uri_folder(location: str) -> UriFolderScan:
    """List ``<location>/<class>/**/<image>`` on its filesystem (hidden names skipped, other
    files ignored, as for a local folder; a bucket has no links to follow).

    Raises:
        DataError: The storage cannot be reached (naming the URI), or the layout is wrong.
    """
    shown = shown_location(location)
    try:
        storage = Storage(location)
        infos = storage.fs.get_file_info(pafs.FileSelector(storage.root, recursive=True))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"image folder {shown} cannot be read: {first_line(exc)}") from None
    root = storage.root.rstrip("/") + "/"
    found: dict[str, list[str]] = {}
    ignored: list[str] = []
    for info in infos:
        relative = info.path[len(root) :]
        parts = relative.split("/")
        if info.type != pafs.FileType.File or any(part.startswith(".") for part in parts):
            continue
        if len(parts) < 2 or not is_image_path(parts[-1]):
            ignored.append(relative)
            continue
        found.setdefault(parts[0], []).append(info.path)
    if ignored:
        more = f", and {len(ignored) - WARN_NAMES} more" if len(ignored) > WARN_NAMES else ""
        warnings.warn(
            f"ignored {len(ignored)} file(s) in {shown} that are not images inside a class "
            f"folder: {', '.join(ignored[:WARN_NAMES])}{more}",
            stacklevel=3,
        )
    if len(found) < 2:
        raise DataError(
            f"image folder {shown} has {len(found)} class folder(s) with images; classification "
            "needs at least 2 (one sub-folder per class)"
        )
    class_names = tuple(sorted(found))
    files = [
        (path, label) for label, name in enumerate(class_names) for path in sorted(found[name])
    ]
    prefix = shown.partition("://")[0] + "://"
    return UriFolderScan(
        class_names,
        tuple(f for f, _ in files),
        tuple(label for _, label in files),
        storage.fs,
        shown,
        prefix,
    )


def _listed(
    path: str | None,
) -> tuple[list[DecodeTask], tuple[str, ...], str, pafs.FileSystem | None, str]:
    """The folder's decode tasks, class names and name in messages, and the filesystem and name
    prefix its files are read with (None and "" for a local folder)."""
    if path is not None and is_uri(str(path)):
        remote = scan_uri_folder(str(path))
        return remote.tasks(), remote.class_names, remote.source, remote.fs, remote.prefix
    scan = scan_imagefolder(path)
    warn_ignored(scan)
    return folder_tasks(scan), scan.class_names, str(scan.root), None, ""


def load_imagefolder(
    *,
    path: str | None,
    image_size: int = 64,
    on_bad_file: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    seed: int = 0,
    mode: str = "memory",
) -> ImageData:
    """Load ``path/<class>/**/<image>`` with every image resized to ``image_size`` squared;
    with ``limit``, a stratified sample of the files is taken first and only it is decoded.
    ``mode`` (``memory``, ``stream``, ``auto``: :func:`~raytl.data.stream.choose_mode`): decode
    them all now, or keep an index of the checked files and decode where they are used."""
    if path is not None and not is_uri(str(path)):
        return _load_local_folder(path, image_size, on_bad_file, max_pixels, limit, seed, mode)
    tasks, class_names, source, fs, prefix = _listed(path)
    if limit is not None:
        labels = np.fromiter((t.label for t in tasks), dtype=np.int64, count=len(tasks))
        tasks = [tasks[i] for i in stratified_indices(labels, limit, seed=seed)]
    mode, note = choose_mode(mode, len(tasks), image_size)
    options: dict[str, Any] = {
        "image_size": image_size,
        "on_bad_file": on_bad_file,
        "max_pixels": max_pixels,
    }
    if mode == "stream":
        rows = FileRows(pa.array([t.name[len(prefix) :] for t in tasks], pa.string()), fs, prefix)
        options.update(class_names=class_names, source=source, note=note)
        return index_tasks(tasks, len(tasks), rows.subset, **options)
    return decode_tasks(tasks, class_names=class_names, source=source, note=note, **options)


def _load_local_folder(
    path: str,
    image_size: int,
    on_bad_file: str,
    max_pixels: int,
    limit: int | None,
    seed: int,
    mode: str,
) -> ImageData:
    """:func:`load_imagefolder` of a local folder, its file list columnar throughout: the
    sample and the stream index are taken on arrays, and each decode task is made when its
    file is read, so a streamed folder costs the driver a few dozen bytes a file."""
    scan = scan_imagefolder(path)
    warn_ignored(scan)
    rows = np.arange(len(scan.labels) + len(scan.refused))
    if limit is not None:
        rows = stratified_indices(scan.all_labels(), limit, seed=seed)
    mode, note = choose_mode(mode, len(rows), image_size)
    options: dict[str, Any] = {
        "class_names": scan.class_names,
        "source": str(scan.root),
        "note": note,
        "image_size": image_size,
        "on_bad_file": on_bad_file,
        "max_pixels": max_pixels,
    }
    if mode != "stream":
        return decode_tasks(list(scan.tasks(rows)), **options)
    used = rows[rows < len(scan.labels)]  # the refused rows come last and are never kept
    relative = scan.relative if limit is None else scan.relative.take(pa.array(used))
    files = FileRows(relative, base=str(scan.root) + os.sep)
    return index_tasks(
        scan.tasks(rows), len(rows), lambda kept: files.subset(kept[: len(used)]), **options
    )
