"""Where raytl writes: one :func:`atomic_write` for local files and one :class:`Storage` for any
pyarrow filesystem (a local or shared folder, ``s3://``, ``gs://``).

Every file raytl writes goes through one of them, so a reader never sees half a file: the bytes go
to a temporary name beside the target, which is then renamed over it (on object stores, moved).
A Parquet file's footer is written last, so a crash mid-write would otherwise leave an unreadable
file; a JSON file cut short would block a resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

Content = str | bytes | Callable[[str], object]  # a writer is called with the temporary path


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a filesystem by scheme (``s3://``, ``file://``) rather than a path."""
    return "://" in str(location)


def shown_location(location: str) -> str:
    """A location as messages name it: a URI without its query (endpoint and options)."""
    return location.partition("?")[0] if is_uri(location) else location


def join_location(location: str | os.PathLike[str], *parts: str) -> str:
    """``parts`` under ``location``, as an absolute path or a URI like the one given (its query,
    such as ``?endpoint_override=...``, kept at the end). Names only: touches no filesystem."""
    text = str(location)
    if not is_uri(text):
        return str(Path(text).resolve().joinpath(*parts))
    base, sep, query = text.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + (sep + query if sep else "")


@contextlib.contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], content: Content) -> Path:
    """Write ``content`` to ``path`` through a temporary file in the same folder, fsync, rename.

    ``content`` is text, bytes, or a function that writes the file at the path it is given (for
    writers that want a path: Parquet, safetensors, matplotlib).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(target) as tmp:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(str(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        tmp.replace(target)
    _fsync_folder(target.parent)
    return target


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on the file ``path`` (created) for the block: one process at
    a time, on a local or shared POSIX folder."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A folder of several files that appears whole or not at all: the block fills a temporary
    folder beside ``path``, which then replaces ``path`` (an earlier one is removed only after)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        yield staging
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        _fsync_folder(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (a no-op where a folder cannot be opened or synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Storage:
    """A folder on any pyarrow filesystem, named by a local path or a URI.

    ``pyarrow.fs.FileSystem.from_uri`` answers "local or s3?"; relative local paths are made
    absolute first (Ray Tune and Train want absolute paths).
    """

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = str(location).rstrip("/") or "/"
        self.uri = text if is_uri(text) else str(Path(text).resolve())
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under this folder."""
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        """The location of ``parts`` under this folder, as a path or URI like the one given."""
        return join_location(self.uri, *parts)

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read()

    def write(self, relative: str, content: Content) -> str:
        """Write one file under this folder, never half-visible; returns its path."""
        if self.is_local:
            return str(atomic_write(self.path(relative), content))
        target = self.path(relative)
        folder, _, name = target.rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        if callable(content):  # a writer wants a local path: stage the file locally first
            with tempfile.TemporaryDirectory(prefix="raytl-") as scratch:
                content(f"{scratch}/{name}")
                content = Path(scratch, name).read_bytes()
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(content.encode() if isinstance(content, str) else content)
        self.fs.move(tmp, target)
        return target

    def write_streamed(self, relative: str, fill: Callable[[Any], None]) -> str:
        """Like :meth:`write` for a file written piece by piece: ``fill`` gets a local path, or
        on a URI an output stream to a temporary object, so the file is never held whole."""
        if self.is_local:
            return str(atomic_write(self.path(relative), fill))
        target = self.path(relative)
        folder, _, name = target.rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as stream:
                fill(stream)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise
        self.fs.move(tmp, target)
        return target

    def probe(self) -> None:
        """Make this folder and write and delete a small file in it: raises ``OSError`` (or a
        pyarrow error) when the storage cannot be reached or refuses the credentials."""
        self.makedirs()
        name = f".raytl-probe-{uuid.uuid4().hex[:8]}"
        self.fs.delete_file(self.write(name, b"raytl"))

    def upload(self, local_folder: Path, names: list[str]) -> None:
        """Copy these files and folders of ``local_folder`` here (``pyarrow.fs.copy_files``)."""
        self.makedirs()
        for name in names:
            source = Path(local_folder) / name
            if source.is_dir():
                # copy_files makes no folders on a local filesystem: make them first
                for folder in [source, *(p for p in source.rglob("*") if p.is_dir())]:
                    self.makedirs(folder.relative_to(local_folder).as_posix())
                pafs.copy_files(
                    str(source.resolve()),
                    self.path(name),
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=self.fs,
                )
            elif source.is_file():
                self.write(name, source.read_bytes())
