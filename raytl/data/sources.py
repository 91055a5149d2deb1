"""Data sources: one loader per kind of input, all returning :class:`ImageData`.

``load_data`` is the single entry point the rest of raytl uses. Loaders never drop a file
silently: an unreadable image is either recorded as a :class:`SkippedFile` (and announced in
one warning that counts and names them) or, with ``on_bad_file="error"``, stops the load
with a :class:`DataError` that names the file and the reason.
"""

from __future__ import annotations

import colorsys
import gzip
import inspect
import json
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from raytl.data.dataset import DataError, ImageData, SkippedFile
from raytl.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    UnreadableImage,
    decode_image,
    is_image_path,
)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEFAULT_FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files."""
FASHION_MNIST_CACHE = Path.home() / ".cache" / "raytl" / "fashion-mnist"
"""Download root used when ``download=True`` and no path is given."""
_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MANIFEST_NAME = "_raytl_manifest.json"
"""Written last by ``convert_imagefolder``: its presence proves the conversion finished."""
CONVERTED_MARKER = "raytl_converted"
"""Schema metadata key on shards written by ``convert_imagefolder``."""
ON_BAD_FILE = ("skip", "error")
_WARN_NAMES = 5
_T = TypeVar("_T")
_R = TypeVar("_R")


# --------------------------------------------------------------------------------------------
# Entry point


def load_data(
    source: str,
    *,
    path: str | None = None,
    image_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    on_bad_file: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    download: bool = False,
    synthetic_classes: int = 4,
    synthetic_per_class: int = 60,
) -> ImageData:
    """Load a data source by name into memory, optionally as a stratified subsample.

    Args:
        source: One of :data:`SOURCES` (``imagefolder``, ``parquet``, ``fashion-mnist``,
            ``digits``, ``synthetic``).
        path: Folder or file for ``imagefolder``, ``parquet`` and ``fashion-mnist``.
        image_size: Side of the square images decoded from files (imagefolder, parquet);
            built-in datasets keep their native size.
        limit: Keep only this many images, stratified by class and deterministic in ``seed``.
        seed: Seed for ``limit`` and for the ``synthetic`` generator.
        on_bad_file: ``"skip"`` records unreadable files in ``ImageData.skipped``;
            ``"error"`` raises a :class:`DataError` naming the first one.
        max_pixels: Refuse (skip) images with more pixels than this (decompression bombs).
        download: Let ``fashion-mnist`` fetch its files with torchvision if they are missing.
        synthetic_classes: Number of classes of the ``synthetic`` source.
        synthetic_per_class: Images per class of the ``synthetic`` source.

    Raises:
        DataError: Unknown source, bad option, or a problem with the data itself.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    if on_bad_file not in ON_BAD_FILE:
        raise DataError(f"on_bad_file must be one of {ON_BAD_FILE}, got {on_bad_file!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or null, got {limit!r}")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"max_pixels must be a positive integer, got {max_pixels!r}")

    options = {
        "path": path,
        "image_size": image_size,
        "seed": seed,
        "on_bad_file": on_bad_file,
        "max_pixels": max_pixels,
        "download": download,
        "synthetic_classes": synthetic_classes,
        "synthetic_per_class": synthetic_per_class,
    }
    loader = SOURCES[source]
    accepted = inspect.signature(loader).parameters
    if path is not None and "path" not in accepted:
        warnings.warn(f"data source {source!r} takes no path; ignoring path={path!r}", stacklevel=2)
    data = loader(**{k: v for k, v in options.items() if k in accepted})
    if limit is not None and limit < len(data):
        data = stratified_subset(data, limit, seed=seed)
    return data


def stratified_subset(data: ImageData, limit: int, *, seed: int) -> ImageData:
    """A deterministic, class-stratified subsample of ``limit`` images, in original order."""
    from sklearn.model_selection import train_test_split

    present = int(np.count_nonzero(np.bincount(data.labels)))
    if limit < present:
        raise DataError(
            f"limit={limit} is smaller than the number of classes ({present}); "
            "a stratified subsample needs at least one image per class"
        )
    everything = np.arange(len(data))
    if len(data) - limit < present:
        # sklearn needs the left-out part to hold every class too; dropping fewer images than
        # there are classes cannot be stratified anyway, so drop a seeded random few.
        rng = np.random.default_rng(seed)
        dropped = rng.choice(everything, size=len(data) - limit, replace=False)
        kept = np.setdiff1d(everything, dropped)
    else:
        try:
            kept, _ = train_test_split(
                everything, train_size=limit, stratify=data.labels, random_state=seed
            )
        except ValueError as exc:
            raise DataError(f"cannot take a stratified sample of {limit} images: {exc}") from exc
    return data.subset(np.sort(kept))


# --------------------------------------------------------------------------------------------
# Parallel decoding shared by the file-based sources


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T]) -> Generator[_R, None, None]:
    """``map`` on a thread pool, results in input order, with a bounded number in flight.

    Pillow releases the GIL while decoding, so threads give real parallelism; the window
    keeps memory bounded when one slow image holds up the in-order results behind it.
    """
    workers = min(32, (os.cpu_count() or 1) + 4)
    window = workers * 4
    pending: deque[Future[_R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raytl-decode") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


@dataclass(frozen=True)
class DecodeTask:
    """One encoded image to decode: where it came from, its label, and how to get its bytes."""

    name: str
    label: int
    read: Callable[[], bytes]


def decode_task(task: DecodeTask, *, size: int | None, max_pixels: int) -> np.ndarray | SkippedFile:
    """Decode one task, turning every failure into a SkippedFile (never raising for bad data)."""
    try:
        data = task.read()
    except OSError as exc:
        return SkippedFile(task.name, f"cannot read file ({type(exc).__name__}: {exc})")
    try:
        return decode_image(data, size=size, max_pixels=max_pixels)
    except UnreadableImage as exc:
        return SkippedFile(task.name, exc.reason)


def decode_tasks(
    tasks: Sequence[DecodeTask],
    *,
    class_names: Sequence[str],
    source: str,
    image_size: int,
    on_bad_file: str,
    max_pixels: int,
) -> ImageData:
    """Decode all tasks in parallel into one ImageData, applying the bad-file policy."""
    images = np.empty((len(tasks), image_size, image_size, 3), dtype=np.uint8)
    keep = np.zeros(len(tasks), dtype=bool)
    skipped: list[SkippedFile] = []
    skipped_labels: list[int] = []

    def work(task: DecodeTask) -> np.ndarray | SkippedFile:
        return decode_task(task, size=image_size, max_pixels=max_pixels)

    results = ordered_map(work, tasks)
    try:
        for i, (task, result) in enumerate(zip(tasks, results, strict=False)):
            if isinstance(result, SkippedFile):
                skipped.append(result)
                skipped_labels.append(task.label)
            else:
                images[i] = result
                keep[i] = True
    finally:
        results.close()

    if skipped and on_bad_file == "error":
        # every bad file at once, so one pass over the folder fixes them all
        listing = "\n".join(f"  {s.path}: {s.reason}" for s in skipped)
        raise DataError(
            f"cannot read {len(skipped)} image file(s) in {source} (data.on_bad_file: error; set "
            f"it to skip to skip unreadable files and report them):\n{listing}"
        )
    labels = np.fromiter((t.label for t in tasks), dtype=np.int64, count=len(tasks))
    if not keep.any():
        raise DataError(
            f"no readable images in {source}: all {len(tasks)} files failed to decode; "
            f"first problems: {_name_some(skipped)}"
        )
    if skipped:
        warn_skipped(skipped, skipped_labels, class_names, source)
    kept_labels = labels[keep]
    # A class whose every file failed would silently vanish from training: refuse that.
    # (A class with no rows at all, e.g. in one Parquet shard of many, is the caller's choice.)
    present = np.bincount(labels, minlength=len(class_names))
    kept = np.bincount(kept_labels, minlength=len(class_names))
    empty = [name for c, name in enumerate(class_names) if present[c] and not kept[c]]
    if empty:
        raise DataError(
            f"{source}: class(es) {', '.join(map(repr, empty))} have no readable images "
            f"(every file was skipped); fix or remove them. First problems: {_name_some(skipped)}"
        )
    if not keep.all():
        images = images[keep]
    return ImageData(
        images=images,
        labels=kept_labels,
        class_names=tuple(class_names),
        source=source,
        skipped=tuple(skipped),
    )


def warn_skipped(
    skipped: Sequence[SkippedFile],
    labels: Sequence[int],
    class_names: Sequence[str],
    source: str,
) -> None:
    """One warning that counts the skipped files per class and names the first few."""
    per_class = Counter(class_names[label] for label in labels)
    counts = ", ".join(f"{name}: {per_class[name]}" for name in class_names if per_class[name])
    warnings.warn(
        f"skipped {len(skipped)} unreadable image file(s) in {source} ({counts}): "
        f"{_name_some(skipped)}. ImageData.skipped and inspect_source list them all.",
        stacklevel=3,
    )


def _name_some(skipped: Sequence[SkippedFile]) -> str:
    shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:_WARN_NAMES])
    more = len(skipped) - _WARN_NAMES
    return shown + (f"; and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------------------------
# imagefolder


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
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
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
        if not found and strict:
            raise DataError(
                f"class folder {class_dir} contains no image files "
                f"(expected {', '.join(sorted(IMAGE_EXTENSIONS))}, in any case)"
            )
        found.sort()
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


def warn_ignored(scan: FolderScan) -> None:
    """Say which non-image or misplaced files were not used, so nothing vanishes unnoticed."""
    if not scan.ignored:
        return
    shown = ", ".join(str(p.relative_to(scan.root)) for p in scan.ignored[:_WARN_NAMES])
    more = len(scan.ignored) - _WARN_NAMES
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


# --------------------------------------------------------------------------------------------
# parquet


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
    if root.is_dir():
        files = tuple(
            sorted(
                p
                for p in root.glob("*.parquet")
                if p.is_file() and not p.name.startswith((".", "_"))
            )
        )
        if not files:
            raise DataError(f"no *.parquet files in {root}")
    else:
        files = (root,)

    class_names: tuple[str, ...] | None = None
    converted = False
    for file in files:
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
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
            or len(names) < 2
        ):
            raise DataError(
                f"{file}: schema metadata 'class_names' must be a JSON list of at least 2 strings"
            )
        if class_names is None:
            class_names = tuple(names)
        elif tuple(names) != class_names:
            raise DataError(
                f"{file}: class_names {names} differ from those of {files[0]} ({list(class_names)})"
            )
        converted = converted or CONVERTED_MARKER.encode() in metadata
    assert class_names is not None
    if root.is_dir():
        _check_manifest(root, files, converted)
    return ParquetShards(files=files, class_names=class_names, source=str(root))


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
        table = fragment.to_table(columns=["image", "label"])
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
            data = blob or b""
            tasks.append(
                DecodeTask(
                    name=f"{fragment.path}#row={row}", label=int(label), read=lambda d=data: d
                )
            )
    return tasks


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


# --------------------------------------------------------------------------------------------
# fashion-mnist

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped (``.gz``) or plain.

    Raises:
        DataError: The file is unreadable, not IDX, or shorter/longer than its header says.
    """
    file = Path(path)
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as fh:
                raw = fh.read()
        else:
            raw = file.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {file} ({type(exc).__name__}: {exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{file} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{file}: IDX header is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{file}: IDX header says shape {dims} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header} bytes; it is truncated or corrupt"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _find_idx_file(directory: Path, name: str) -> Path | None:
    """The gzipped or plain IDX file ``name`` in ``directory``, if present."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """All four Fashion-MNIST files in ``directory``, or None if any is missing."""
    found = {name: _find_idx_file(directory, name) for name in _FASHION_MNIST_FILES}
    if any(f is None for f in found.values()):
        return None
    return {name: f for name, f in found.items() if f is not None}


def load_fashion_mnist(*, path: str | None = None, download: bool = False) -> ImageData:
    """Fashion-MNIST train + test (70,000 28x28 images as RGB) from local IDX files.

    Both official splits are concatenated because raytl carves its own test split.
    """
    root = Path(path).expanduser() if path else None
    candidates = (
        [root, root / "FashionMNIST" / "raw"]
        if root is not None
        else [Path(DEFAULT_FASHION_MNIST_PATH), FASHION_MNIST_CACHE / "FashionMNIST" / "raw"]
    )
    files = next((f for f in map(_find_idx_files, candidates) if f is not None), None)
    if files is None and download:
        _download_fashion_mnist(root or FASHION_MNIST_CACHE)
        files = _find_idx_files(candidates[-1])
    if files is None:
        where = candidates[0]
        missing = [n for n in _FASHION_MNIST_FILES if _find_idx_file(where, n) is None]
        raise DataError(
            f"Fashion-MNIST files not found: {where} lacks {', '.join(m + '.gz' for m in missing)}. "
            "Install them with `apt-get install dataset-fashion-mnist` (they go to "
            f"{DEFAULT_FASHION_MNIST_PATH}), set data.path to a folder holding the four IDX "
            "files, or set data.download: true to fetch them with torchvision"
        )
    parts_x, parts_y = [], []
    for split in ("train", "t10k"):
        images_file = files[f"{split}-images-idx3-ubyte"]
        labels_file = files[f"{split}-labels-idx1-ubyte"]
        x, y = read_idx(images_file), read_idx(labels_file)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise DataError(
                f"{images_file}: expected uint8 images of shape (N, 28, 28), got {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{labels_file}: expected {len(x)} labels, got shape {y.shape}")
        if len(y) and int(y.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(
                f"{labels_file}: label {int(y.max())} is not a Fashion-MNIST class (0-9)"
            )
        parts_x.append(x)
        parts_y.append(y.astype(np.int64))
    gray = np.concatenate(parts_x)
    return ImageData(
        images=np.repeat(gray[:, :, :, None], 3, axis=3),
        labels=np.concatenate(parts_y),
        class_names=FASHION_MNIST_CLASSES,
        source=f"fashion-mnist ({files['train-images-idx3-ubyte'].parent})",
    )


def _download_fashion_mnist(root: Path) -> None:
    """Fetch the IDX files with torchvision (online users only; puts them in root/FashionMNIST/raw)."""
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as exc:
        raise DataError("data.download: true needs torchvision, which is not installed") from exc
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"could not download Fashion-MNIST to {root} ({type(exc).__name__}: {exc}); "
            "offline, use `apt-get install dataset-fashion-mnist` instead"
        ) from exc


# --------------------------------------------------------------------------------------------
# digits and synthetic


def load_digits() -> ImageData:
    """scikit-learn's 1,797 8x8 digits (ships with sklearn: always available offline)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    gray = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return ImageData(
        images=np.repeat(gray[:, :, :, None], 3, axis=3),
        labels=np.asarray(bunch.target, dtype=np.int64),
        class_names=tuple(str(d) for d in range(10)),
        source="digits (scikit-learn)",
    )


SYNTHETIC_SIZE = 32


def load_synthetic(
    *, seed: int = 0, synthetic_classes: int = 4, synthetic_per_class: int = 60
) -> ImageData:
    """A learnable, seeded 32x32 dataset for fast tests that need no files.

    Each class has its own colour pair, stripe orientation and frequency; each sample gets a
    random phase (a shift), a small rotation, contrast/brightness jitter and pixel noise, so
    no single pixel gives the class away but a small CNN or a linear probe separates them.
    """
    if synthetic_classes < 2:
        raise DataError(f"synthetic_classes must be at least 2, got {synthetic_classes}")
    if synthetic_per_class < 1:
        raise DataError(f"synthetic_per_class must be at least 1, got {synthetic_per_class}")
    k, m, size = synthetic_classes, synthetic_per_class, SYNTHETIC_SIZE
    rng = np.random.default_rng(seed)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((k * m, size, size, 3), dtype=np.uint8)
    for c in range(k):
        hue = c / k
        fg = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255.0
        bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.4, 0.35)) * 255.0
        theta = np.pi * c / k + rng.normal(0.0, 0.08, size=m)
        freq = 2.0 + 1.5 * (c % 3)
        phase = rng.uniform(0.0, 2.0 * np.pi, size=m)
        contrast = rng.uniform(0.6, 1.0, size=m)
        brightness = rng.uniform(-25.0, 25.0, size=m)
        proj = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
        wave = 0.5 + 0.5 * np.sin(2.0 * np.pi * freq * proj + phase[:, None, None])
        wave = wave * contrast[:, None, None]
        pixels = bg + (fg - bg) * wave[..., None] + brightness[:, None, None, None]
        pixels = pixels + rng.normal(0.0, 18.0, size=pixels.shape)
        images[c * m : (c + 1) * m] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return ImageData(
        images=images,
        labels=np.repeat(np.arange(k, dtype=np.int64), m),
        class_names=tuple(f"class_{c}" for c in range(k)),
        source=f"synthetic ({k} classes x {m}, seed {seed})",
    )


SOURCES: dict[str, Callable[..., ImageData]] = {
    "imagefolder": load_imagefolder,
    "parquet": load_parquet,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "synthetic": load_synthetic,
}
"""Loaders by source name; ``load_data`` passes each only the options it declares."""
