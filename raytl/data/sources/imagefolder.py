"""The ``imagefolder`` source: ``path/<class>/**/<image>``, one sub-folder per class.

:func:`scan_imagefolder` validates the layout and lists the files without decoding any, so
``inspect_source`` and ``convert_imagefolder`` see exactly the files that loading would use.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from raytl.data.dataset import DataError, ImageData
from raytl.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, is_image_path
from raytl.data.sources.decode import WARN_NAMES, DecodeTask, decode_tasks


@dataclass(frozen=True)
class FolderScan:
    """What an image folder holds, before any decoding."""

    root: Path
    class_names: tuple[str, ...]
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    ignored: tuple[Path, ...]


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
    ignored: list[Path] = []
    class_dirs = _class_folders(root, ignored)
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = _class_images(class_dir, ignored)
        if not found and strict:
            raise DataError(
                f"class folder {class_dir} contains no image files "
                f"(expected {', '.join(sorted(IMAGE_EXTENSIONS))}, in any case)"
            )
        files.extend(found)
        labels.extend([label] * len(found))
    if len(class_dirs) < 2 and strict:
        raise DataError(
            f"image folder {root} has only one class folder ({class_dirs[0].name}); "
            "classification needs at least 2 classes"
        )
    return FolderScan(
        root=root,
        class_names=tuple(d.name for d in class_dirs),
        files=tuple(files),
        labels=tuple(labels),
        ignored=tuple(ignored),
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


def _class_images(class_dir: Path, ignored: list[Path]) -> list[Path]:
    """The image files anywhere under ``class_dir``, sorted; non-images go to ``ignored``."""
    found: list[Path] = []
    seen = {os.path.realpath(class_dir)}  # symlinked folders are followed, cycles are not
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            (found if is_image_path(name) else ignored).append(Path(dirpath) / name)
    found.sort()
    return found


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
    """Decode tasks that read each file in the worker thread (I/O overlaps decoding)."""
    return [
        DecodeTask(name=str(file), label=label, read=file.read_bytes)
        for file, label in zip(scan.files, scan.labels, strict=True)
    ]


def load_imagefolder(
    *,
    path: str | None,
    image_size: int = 64,
    on_bad_file: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageData:
    """Load ``path/<class>/**/<image>`` with every image resized to ``image_size`` squared."""
    scan = scan_imagefolder(path)
    warn_ignored(scan)
    return decode_tasks(
        folder_tasks(scan),
        class_names=scan.class_names,
        source=str(scan.root),
        image_size=image_size,
        on_bad_file=on_bad_file,
        max_pixels=max_pixels,
    )
