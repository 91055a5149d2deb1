"""Walk an image folder's class folders without leaving it.

Links are followed only while they stay inside the data folder: a file or folder whose real
path (``os.path.realpath``) lies outside the real root is refused with the reason, a folder
link back to an enclosing folder (a cycle) is not followed, and a file reached by two paths
(from two classes, or twice in one) is used once, the other path refused naming both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from raytl.data.dataset import SkippedFile
from raytl.data.images import is_image_path


def is_inside(real: str, real_root: str) -> bool:
    """Whether the real path ``real`` is ``real_root`` or below it."""
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


@dataclass
class _Found:
    """One image file: its path in the folder, its real path, its class."""

    path: Path
    real: str
    label: int


@dataclass
class FolderWalk:
    """The image files of every class, and what was refused or ignored on the way."""

    root: Path
    real_root: str
    found: list[_Found] = field(default_factory=list)
    refused: list[tuple[SkippedFile, int]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)

    def walk_class(self, class_dir: Path, label: int) -> int:
        """Collect the image files under ``class_dir``; how many were found (or refused)."""
        before = len(self.found) + len(self.refused)
        real_class = os.path.realpath(class_dir)
        if not is_inside(real_class, self.real_root):
            self._refuse(
                class_dir, f"folder links outside the data folder (to {real_class})", label
            )
            return len(self.found) + len(self.refused) - before
        seen = {real_class}  # a folder reached twice in one class is walked once
        found: list[_Found] = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            real_dir = os.path.realpath(dirpath)
            dirnames[:] = self._folders_to_walk(dirpath, real_dir, sorted(dirnames), seen, label)
            for name in sorted(filenames):
                if not name.startswith("."):
                    found += self._file(Path(dirpath) / name, real_dir, label)
        found.sort(key=lambda f: f.path)
        self.found += found
        return len(self.found) + len(self.refused) - before

    def _folders_to_walk(
        self, dirpath: str, real_dir: str, names: list[str], seen: set[str], label: int
    ) -> list[str]:
        keep = []
        for name in names:
            if name.startswith("."):
                continue
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

    def _file(self, path: Path, real_dir: str, label: int) -> list[_Found]:
        if not is_image_path(path.name):
            self.ignored.append(path)
            return []
        real = os.path.realpath(path) if path.is_symlink() else os.path.join(real_dir, path.name)
        if not is_inside(real, self.real_root):
            self._refuse(path, f"links outside the data folder (to {real})", label)
            return []
        return [_Found(path, real, label)]

    def _refuse(self, path: Path, reason: str, label: int) -> None:
        self.refused.append((SkippedFile(str(path), f"{reason}; not used"), label))

    def used_once(self, class_names: tuple[str, ...]) -> list[_Found]:
        """The files, each real file once: a direct path wins over one through a link, then
        the first class; every other path to it is refused with a reason naming both."""
        order = sorted(range(len(self.found)), key=lambda i: (not self._direct(i), i))
        owner: dict[str, _Found] = {}
        for i in order:
            entry = self.found[i]
            first = owner.setdefault(entry.real, entry)
            if first is not entry:
                self._refuse(
                    entry.path,
                    f"the same file as {first.path} (class {class_names[first.label]!r}), "
                    f"reached again from class {class_names[entry.label]!r}",
                    entry.label,
                )
        kept = {id(entry) for entry in owner.values()}
        return [entry for entry in self.found if id(entry) in kept]

    def _direct(self, i: int) -> bool:
        """Whether a file's path reaches it without passing through a link."""
        entry = self.found[i]
        relative = os.path.relpath(entry.path, self.root)
        return entry.real == os.path.normpath(os.path.join(self.real_root, relative))
