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

    @property
    def source(self) -> str:
        return str(self.root)

    def all_labels(self) -> np.ndarray:
        """The labels of the files used, then of the refused ones (the order of the tasks)."""
        if not self.refused:
            return self.labels
        return np.concatenate([self.labels, np.asarray(self.refused_labels, dtype=np.int64)])

    def ignored_names(self) -> list[str]:
        return [str(path.relative_to(self.root)) for path in self.ignored]

    def file_rows(self, relative: pa.Array) -> FileRows:
        """The stream index's rows for ``relative`` (some of :attr:`relative`)."""
        return FileRows(relative, base=str(self.root) + os.sep)

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
            raise no_images(str(class_dir))
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


def no_images(class_folder: str) -> DataError:
    """The error for a class folder (local or on a URI) that holds no image file."""
    return DataError(
        f"class folder {class_folder} contains no image files "
        f"(expected {', '.join(sorted(IMAGE_EXTENSIONS))}, in any case)"
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


def warn_ignored(scan: FolderScan | UriFolderScan) -> None:
    """Say which non-image or misplaced files were not used, so nothing vanishes unnoticed."""
    if not scan.ignored:
        return
    shown = ", ".join(scan.ignored_names()[:WARN_NAMES])
    more = len(scan.ignored) - WARN_NAMES
    warnings.warn(
        f"ignored {len(scan.ignored)} file(s) in {scan.source} that are not images inside a class "
        f"folder: {shown}" + (f", and {more} more" if more > 0 else ""),
        stacklevel=3,
    )


def folder_tasks(scan: FolderScan) -> list[DecodeTask]:
    """Every decode task of the folder (:meth:`FolderScan.tasks`), the refused files last."""
    return list(scan.tasks())


@dataclass(frozen=True)
class UriFolderScan:
    """An image folder on a pyarrow filesystem URI, ``<uri>/<class>/**/<image>``, listed as a
    local one is: the files' paths relative to the folder as one Arrow string array, in sorted
    path order, and their labels (a bucket has no links, so nothing is refused)."""

    class_names: tuple[str, ...]
    relative: pa.Array
    labels: np.ndarray
    ignored: tuple[str, ...]  # relative paths
    fs: pafs.FileSystem
    source: str  # the URI without its query
    base: str  # the folder's path on fs, with a trailing "/"
    prefix: str  # "s3://": a file's name in messages is prefix + base + relative
    refused: tuple[SkippedFile, ...] = ()

    def all_labels(self) -> np.ndarray:
        return self.labels

    def ignored_names(self) -> list[str]:
        return list(self.ignored)

    def tasks(self, rows: Iterable[int] | None = None) -> Iterator[DecodeTask]:
        """Decode tasks for ``rows`` (default all), made one at a time; each reads its file when
        it runs."""
        for row in range(len(self.labels)) if rows is None else rows:
            path = self.base + self.relative[row].as_py()
            yield DecodeTask(
                self.prefix + path, int(self.labels[row]), partial(_read_uri, self.fs, path)
            )

    def file_rows(self, relative: pa.Array) -> FileRows:
        return FileRows(relative, self.fs, self.prefix, self.base)


def _read_uri(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except pa.ArrowException as exc:  # read_task records OSErrors as skipped files
        raise OSError(str(exc)) from exc


def scan_uri_folder(location: str) -> UriFolderScan:
    """List ``<location>/<class>/**/<image>`` on its filesystem, one class folder at a time
    (hidden names skipped, other files ignored, an empty class folder refused, as for a local
    folder).

    Raises:
        DataError: The storage cannot be reached (naming the URI), or the layout is wrong.
    """
    shown = shown_location(location)
    try:
        storage = Storage(location)
        top = storage.fs.get_file_info(pafs.FileSelector(storage.root))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"image folder {shown} cannot be read: {first_line(exc)}") from None
    base = storage.root.rstrip("/") + "/"
    visible = sorted((i for i in top if not i.base_name.startswith(".")), key=lambda i: i.base_name)
    ignored = [i.base_name for i in visible if i.type != pafs.FileType.Directory]
    class_names = tuple(i.base_name for i in visible if i.type == pafs.FileType.Directory)
    if len(class_names) < 2:
        raise DataError(
            f"image folder {shown} has {len(class_names)} class folder(s); classification needs "
            "at least 2 (one sub-folder per class)"
        )
    chunks, labels = [], []
    for label, name in enumerate(class_names):
        files = _uri_class_files(storage.fs, base, name, ignored, shown)
        chunks.append(pa.array(files, pa.string()))
        labels.append(np.full(len(files), label, dtype=np.int64))
    return UriFolderScan(
        class_names,
        pa.concat_arrays(chunks),
        np.concatenate(labels),
        tuple(ignored),
        storage.fs,
        shown,
        base,
        shown.partition("://")[0] + "://",
    )


def _uri_class_files(
    fs: pafs.FileSystem, base: str, name: str, ignored: list[str], shown: str
) -> list[str]:
    """The image files of class folder ``name``, relative to ``base``, in the order of sorted
    ``Path``s (by component, as a local folder's); its other visible files go to ``ignored``."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(base + name, recursive=True))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"class folder {shown}/{name} cannot be read: {first_line(exc)}") from None
    files: list[list[str]] = []
    for info in infos:
        parts = info.path[len(base) :].split("/")
        if info.type != pafs.FileType.File or any(part.startswith(".") for part in parts):
            continue
        if is_image_path(parts[-1]):
            files.append(parts)
        else:
            ignored.append("/".join(parts))
    if not files:
        raise no_images(f"{shown}/{name}")
    files.sort()
    return ["/".join(parts) for parts in files]


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
    """Load ``path/<class>/**/<image>`` (a local folder or a URI) with every image resized to
    ``image_size`` squared; with ``limit``, a stratified sample of the files is taken first and
    only it is decoded. ``mode`` (``memory``, ``stream``, ``auto``:
    :func:`~raytl.data.stream.choose_mode`): decode them all now, or keep an index of the
    checked files and decode where they are used.

    The file list stays columnar throughout: the sample and the stream index are taken on
    arrays, and each decode task is made when its file is read, so a streamed folder costs the
    driver a few dozen bytes a file."""
    remote = path is not None and is_uri(str(path))
    scan: FolderScan | UriFolderScan = (
        scan_uri_folder(str(path)) if remote else scan_imagefolder(path)
    )
    warn_ignored(scan)
    labels = scan.all_labels()
    rows = None if limit is None else stratified_indices(labels, limit, seed=seed)
    count = len(labels) if rows is None else len(rows)
    mode, note = choose_mode(mode, count, image_size)
    options: dict[str, Any] = {
        "class_names": scan.class_names,
        "source": scan.source,
        "note": note,
        "image_size": image_size,
        "on_bad_file": on_bad_file,
        "max_pixels": max_pixels,
    }
    if mode != "stream":
        return decode_tasks(list(scan.tasks(rows)), **options)
    if rows is None:  # every file: the scan's arrays as they are
        used, files = len(scan.labels), scan.file_rows(scan.relative)
    else:  # the refused rows come last and are never kept
        used = int(np.searchsorted(rows, len(scan.labels)))
        files = scan.file_rows(scan.relative.take(pa.array(rows[:used])))
    return index_tasks(
        scan.tasks(rows),
        count,
        lambda kept: files.subset(kept[:used]),
        labels=labels if rows is None else labels[rows],
        **options,
    )
