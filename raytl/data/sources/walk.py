"""Walk an image folder's class folders without leaving it, keeping the file list columnar.

Links are followed only while they stay inside the data folder: a file or folder whose real
path (``os.path.realpath``) lies outside the real root is refused with the reason, a folder
link back to an enclosing folder (a cycle) is not followed, and a file reached by two paths
(from two classes, or twice in one) is used once, the other path refused naming both.

The files found are kept as one Arrow binary array of paths relative to the root and an array of
labels (their bytes and 12 more a file, where a ``Path`` and a record per file took a kilobyte):
the walk lists one directory at a time, in the order of ``sorted`` paths, so nothing about the
whole folder is ever held as Python objects per file.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from raytl.data.dataset import SkippedFile
from raytl.data.images import is_image_path


def is_inside(real: str, real_root: str) -> bool:
    """Whether the real path ``real`` is ``real_root`` or below it."""
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def path_at(paths: pa.Array, row: int) -> str:
    """Row ``row`` of a walk's paths (file-system bytes) as a path string."""
    return os.fsdecode(paths[row].as_py())


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk does
    except OSError:
        return False


@dataclass
class FolderWalk:
    """The image files of every class, and what was refused or ignored on the way.

    Row ``i`` is the file ``root / relative[i]`` of class ``labels[i]``; ``linked`` holds the
    rows reached through a link (a file link, or a folder reached through one) with their real
    paths: only those can be a second path to a file already used."""

    root: Path
    real_root: str
    refused: list[tuple[SkippedFile, int]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    linked: list[tuple[int, str]] = field(default_factory=list)
    _names: bytearray = field(default_factory=bytearray)  # the paths' fs bytes, back to back
    _ends: array[int] = field(default_factory=lambda: array("i", [0]))  # where each one ends
    _labels: array[int] = field(default_factory=lambda: array("q"))

    @property
    def count(self) -> int:
        return len(self._labels)

    def relative(self) -> pa.Array:
        """The paths of the rows found, relative to the root, as one binary array of their
        file-system bytes (``os.fsencode``: a name need not be UTF-8), over the walk's own
        buffers (no copy); :func:`path_at` reads one back."""
        kind = pa.binary() if self._ends.typecode == "i" else pa.large_binary()
        buffers = [None, pa.py_buffer(self._ends), pa.py_buffer(self._names)]
        return pa.Array.from_buffers(kind, self.count, buffers)

    def labels(self) -> np.ndarray:
        """The rows' labels (a read-only view of the walk's own array)."""
        return np.frombuffer(self._labels, dtype=np.int64)

    def walk_class(self, class_dir: Path, label: int) -> int:
        """Collect the image files under ``class_dir``; how many were found (or refused)."""
        before = self.count + len(self.refused)
        real_class = os.path.realpath(class_dir)
        if not is_inside(real_class, self.real_root):
            self._refuse(
                class_dir, f"folder links outside the data folder (to {real_class})", label
            )
        else:  # a folder reached twice in one class is walked once
            self._walk_folder(str(class_dir), real_class, {real_class}, label)
        return self.count + len(self.refused) - before

    def _walk_folder(self, path: str, real_dir: str, seen: set[str], label: int) -> None:
        """The files of one folder and, at their place in name order, of its sub-folders (so
        the rows come in the order of their sorted paths). Its sub-folders are chosen, and
        marked seen, before any is walked, as ``os.walk`` does top-down. The listing is kept as
        (name, is a folder, is a link) while the folder is walked, never as ``DirEntry``s."""
        try:
            with os.scandir(path) as found:
                listing = sorted(
                    (e.name, _is_dir(e), e.is_symlink()) for e in found if e.name[0] != "."
                )
        except OSError:  # unreadable: skipped, as os.walk skips it
            return
        folders = [name for name, is_dir, _ in listing if is_dir]
        walked = set(self._folders_to_walk(path, real_dir, folders, seen, label))
        relative = os.path.relpath(path, self.root)
        direct = real_dir == os.path.normpath(os.path.join(self.real_root, relative))
        for name, is_dir, link in listing:
            if name in walked:
                sub = os.path.join(path, name)
                self._walk_folder(sub, os.path.realpath(sub), seen, label)
            elif not is_dir and self._file(path, name, link, real_dir, direct, label):
                self._names += os.fsencode(os.path.join(relative, name))
                if len(self._names) >= 2**31 and self._ends.typecode == "i":
                    self._ends = array("q", self._ends)  # 64-bit offsets past 2 GiB of names
                self._ends.append(len(self._names))
                self._labels.append(label)

    def _folders_to_walk(
        self, dirpath: str, real_dir: str, names: list[str], seen: set[str], label: int
    ) -> list[str]:
        keep = []
        for name in names:
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if not is_inside(real, self.real_root):
                self._refuse(Path(path), f"folder links outside the data folder (to {real})", label)
            elif is_inside(real_dir, real):
                self._refuse(Path(path), f"folder link loops back to {real} (a cycle)", label)
            elif real not in seen:
                seen.add(real)
                keep.append(name)
        return keep

    def _file(
        self, folder: str, name: str, link: bool, real_dir: str, direct: bool, label: int
    ) -> bool:
        """Whether ``folder/name`` is a file to use (the next row); one reached through a link
        is noted in ``linked``. Strings, not ``Path`` objects: pathlib interns every part it
        parses, which would keep every file name for good."""
        path = os.path.join(folder, name)
        if not is_image_path(name):
            self.ignored.append(Path(path))
            return False
        real = os.path.realpath(path) if link else os.path.join(real_dir, name)
        if not is_inside(real, self.real_root):
            self._refuse(Path(path), f"links outside the data folder (to {real})", label)
            return False
        if link or not direct:
            self.linked.append((self.count, real))
        return True

    def _refuse(self, path: Path, reason: str, label: int) -> None:
        self.refused.append((SkippedFile(str(path), f"{reason}; not used"), label))

    def used_once(self, class_names: tuple[str, ...]) -> np.ndarray:
        """The mask of the rows to use, each real file once: a direct path wins over one
        through a link, then the first class; every other path to it is refused with a reason
        naming both. Only rows reached through a link can repeat a file."""
        keep = np.ones(self.count, dtype=bool)
        if not self.linked:
            return keep
        relative, labels = self.relative(), self.labels()
        through_link = {row for row, _ in self.linked}
        direct = {  # a direct row's real path is the real root joined with its relative path
            path_at(relative, row): row for row in range(self.count) if row not in through_link
        }
        owner: dict[str, int] = {}
        for row, real in self.linked:
            first = direct.get(os.path.relpath(real, self.real_root))
            if first is None:
                first = owner.setdefault(real, row)
            if first != row:
                keep[row] = False
                self._refuse(
                    self.root / path_at(relative, row),
                    f"the same file as {self.root / path_at(relative, first)} (class "
                    f"{class_names[labels[first]]!r}), reached again from class "
                    f"{class_names[labels[row]]!r}",
                    int(labels[row]),
                )
        return keep
