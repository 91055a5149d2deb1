"""Parallel decoding shared by the file-based sources (image folders, Parquet shards).

A source turns its input into :class:`DecodeTask` objects (a name, a label and a way to read
the encoded bytes); :func:`decode_tasks` decodes them on a thread pool and applies the
bad-file policy in one place, so every source skips, reports and refuses the same way.
All decoding threads share :data:`DECODE_BUDGET`, so the pixels decoded at once stay bounded,
and every file's bytes are hashed, so byte-identical copies share a group in ``ImageData``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np

from raytl import console
from raytl.data.budget import PixelBudget
from raytl.data.dataset import DataError, ImageData, SkippedFile
from raytl.data.images import DECODE_PIXEL_BUDGET, UnreadableImage, check_image, decode_image
from raytl.data.stream import Rows, StreamedImages

WARN_NAMES = 5
"""How many files a warning or error names before it says "and N more"."""

DECODE_BUDGET = PixelBudget(DECODE_PIXEL_BUDGET)
"""The one pixel budget of this process's decoding threads (loading, inspecting, converting)."""

_T = TypeVar("_T")
_R = TypeVar("_R")


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


def shown_as(items: Iterable[_T], shown: Any) -> Generator[_T, None, None]:
    """``items``, counted on the progress bar ``shown`` (closed at the end)."""
    try:
        for item in items:
            yield item
            shown.update(1)
    finally:
        shown.close()


@dataclass(frozen=True)
class DecodeTask:
    """One encoded image to decode: where it came from, its label, and how to get its bytes.

    ``refused`` is set for a file found but not to be read (a link leaving the data folder,
    a second path to a file already used): it becomes a SkippedFile with that reason.
    """

    name: str
    label: int
    read: Callable[[], bytes]
    refused: str | None = None


class DecodedImage(NamedTuple):
    """A decoded image and a digest of its file bytes (equal digests: byte-identical files)."""

    pixels: np.ndarray
    digest: bytes


def read_task(task: DecodeTask) -> bytes | SkippedFile:
    """The task's encoded bytes, or the SkippedFile saying why there are none."""
    if task.refused is not None:
        return SkippedFile(task.name, task.refused)
    try:
        return task.read()
    except OSError as exc:
        return SkippedFile(task.name, f"cannot read file ({type(exc).__name__}: {exc})")


def file_digest(data: bytes) -> bytes:
    """The digest that identifies byte-identical files (BLAKE2b, 128 bits)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def decode_task(
    task: DecodeTask, *, size: int | None, max_pixels: int, budget: PixelBudget | None = None
) -> DecodedImage | SkippedFile:
    """Decode one task, turning every failure into a SkippedFile (never raising for bad data).

    The pixels are reserved from ``budget`` while decoding (default :data:`DECODE_BUDGET`).
    """
    data = read_task(task)
    if isinstance(data, SkippedFile):
        return data
    try:
        budget = DECODE_BUDGET if budget is None else budget
        pixels = decode_image(data, size=size, max_pixels=max_pixels, budget=budget)
    except UnreadableImage as exc:
        return SkippedFile(task.name, exc.reason)
    return DecodedImage(pixels, file_digest(data))


@dataclass
class _Decoded:
    """The outcome of decoding every task: pixels, which rows are good, and what failed."""

    images: np.ndarray
    keep: np.ndarray
    skipped: list[SkippedFile]
    skipped_labels: list[int]
    digests: list[bytes] = field(default_factory=list)


def copy_groups(
    digests: Sequence[bytes] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Group ids for files by digest within a class: each file's id is the position of its first
    copy with the same label. (The same bytes filed under two classes is a labelling question,
    not a split one: those stay separate groups, so each class keeps its own images.)

    ``digests``: 16-byte digests, as bytes objects or one ``(N, 16)`` uint8 array."""
    if not isinstance(digests, np.ndarray):
        digests = np.frombuffer(b"".join(digests), dtype=np.uint8)
    halves = np.ascontiguousarray(digests).reshape(-1, 16).view("<u8")  # (N, 2)
    return halves_copy_groups(halves[:, 0], halves[:, 1], labels)


def halves_copy_groups(
    first: np.ndarray, second: np.ndarray, labels: Sequence[int] | np.ndarray
) -> np.ndarray:
    """:func:`copy_groups` of digests held as their two 8-byte halves (``uint64`` arrays).

    Copies share the first half, so only the rows whose first half repeats are grouped exactly
    (a stable sort by label and both halves, then one pass over neighbours); in data without
    copies that is a sort of one copy of the first half, the scratch memory a streamed index
    of a large folder can afford. 32-bit ids below 2**31 files."""
    labels = np.asarray(labels, dtype=np.int64)
    count = len(labels)
    groups = np.arange(count, dtype=np.int32 if count < 2**31 else np.int64)
    ordered = np.sort(first)
    repeats = ordered[1:] == ordered[:-1]
    if not repeats.any():
        return groups
    repeated = np.unique(ordered[1:][repeats])
    del ordered, repeats
    candidates = np.flatnonzero(np.isin(first, repeated)).astype(groups.dtype)
    order = np.lexsort((second[candidates], first[candidates], labels[candidates]))
    order = order.astype(groups.dtype)  # stable: the first copy first
    starts = np.ones(len(order), dtype=bool)  # where a new (label, digest) begins, in order
    for column in (labels, first, second):
        values = column[candidates[order]]
        starts[1:] &= values[1:] == values[:-1]
    np.logical_not(starts, out=starts)
    starts[:1] = True
    firsts = order[starts][np.cumsum(starts, dtype=order.dtype) - 1]  # positions in candidates
    groups[candidates[order]] = candidates[firsts]
    return groups


def _decode_all(tasks: Sequence[DecodeTask], *, image_size: int, max_pixels: int) -> _Decoded:
    """Decode every task in parallel into one preallocated array, recording the failures."""
    decoded = _Decoded(
        images=np.empty((len(tasks), image_size, image_size, 3), dtype=np.uint8),
        keep=np.zeros(len(tasks), dtype=bool),
        skipped=[],
        skipped_labels=[],
    )

    def work(task: DecodeTask) -> DecodedImage | SkippedFile:
        return decode_task(task, size=image_size, max_pixels=max_pixels)

    results = ordered_map(work, tasks)
    try:
        shown = console.bar(len(tasks), "decoding", unit="img")
        for i, (task, result) in enumerate(zip(tasks, shown_as(results, shown), strict=False)):
            if isinstance(result, SkippedFile):
                decoded.skipped.append(result)
                decoded.skipped_labels.append(task.label)
            else:
                decoded.images[i] = result.pixels
                decoded.keep[i] = True
                decoded.digests.append(result.digest)
    finally:
        results.close()
    return decoded


def decode_tasks(
    tasks: Sequence[DecodeTask],
    *,
    class_names: Sequence[str],
    source: str,
    image_size: int,
    on_bad_file: str,
    max_pixels: int,
    note: str = "",
) -> ImageData:
    """Decode all tasks in parallel into one ImageData, applying the bad-file policy."""
    decoded = _decode_all(tasks, image_size=image_size, max_pixels=max_pixels)
    labels = np.fromiter((t.label for t in tasks), dtype=np.int64, count=len(tasks))
    keep = _apply_policy(decoded, labels, class_names, source, on_bad_file)
    images = decoded.images if keep.all() else decoded.images[keep]
    return _image_data(images, decoded, labels[keep], class_names, source, note)


def index_tasks(
    tasks: Iterable[DecodeTask],
    count: int,
    rows: Callable[[np.ndarray], Rows],
    *,
    class_names: Sequence[str],
    source: str,
    image_size: int,
    on_bad_file: str,
    max_pixels: int,
    note: str = "",
    labels: np.ndarray | None = None,
) -> ImageData:
    """The streamed ImageData of the ``count`` ``tasks`` (made as they are read): each file is
    read once, checked without decoding (:func:`~raytl.data.images.check_image`) and digested,
    and only its place in ``rows`` (given the mask of the tasks kept) is kept; the bad-file
    policy is the in-memory one. ``labels``: the tasks' labels where the caller holds them
    already as an array (not filled again). Labels, digests and the mask fill preallocated
    arrays, so the index costs 25 bytes a file here, and keeps 8 of the digest's 16."""
    checked = _Decoded(np.empty(0, np.uint8), np.zeros(count, bool), [], [])
    filled = labels is None
    labels = np.empty(count, dtype=np.int64) if labels is None else labels
    identities = np.zeros(count, dtype="<u8")  # the digests' first halves, kept in the index
    second = np.zeros(count, dtype="<u8")  # and their second halves, for copy grouping only

    def work(task: DecodeTask) -> tuple[int, bytes | SkippedFile]:
        data = read_task(task)
        if isinstance(data, SkippedFile):
            return task.label, data
        try:
            check_image(data, max_pixels=max_pixels)
        except UnreadableImage as exc:
            return task.label, SkippedFile(task.name, exc.reason)
        return task.label, file_digest(data)

    shown = console.bar(count, "checking files", unit="file")
    results = shown_as(ordered_map(work, tasks), shown)  # a bounded window in flight
    for i, (label, result) in enumerate(results):
        if filled:
            labels[i] = label
        if isinstance(result, SkippedFile):
            checked.skipped.append(result)
            checked.skipped_labels.append(label)
        else:
            checked.keep[i] = True
            identities[i], second[i] = np.frombuffer(result, dtype="<u8")
    kept = _apply_policy(checked, labels, class_names, source, on_bad_file)
    if not kept.all():  # else the arrays as they are, not copies
        identities, second, labels = identities[kept], second[kept], labels[kept]
    groups = halves_copy_groups(identities, second, labels)  # on the whole digest
    del second
    images = StreamedImages(rows(kept), identities, size=image_size, max_pixels=max_pixels)
    return _image_data(images, checked, labels, class_names, source, note, groups)


def _image_data(
    images: np.ndarray | StreamedImages,
    outcome: _Decoded,
    labels: np.ndarray,
    class_names: Sequence[str],
    source: str,
    note: str,
    groups: np.ndarray | None = None,
) -> ImageData:
    """The ImageData of the kept files: their images, labels and copy groups (``groups``, or
    by the outcome's digests), and the skipped."""
    return ImageData(
        images=images,
        labels=labels,
        class_names=tuple(class_names),
        source=source,
        skipped=tuple(outcome.skipped),
        groups=copy_groups(outcome.digests, labels) if groups is None else groups,
        note=note,
    )


def _apply_policy(
    decoded: _Decoded,
    labels: np.ndarray,
    class_names: Sequence[str],
    source: str,
    on_bad_file: str,
) -> np.ndarray:
    """The mask of the files to keep; raises for ``on_bad_file: error``, for no readable file,
    and for a class whose every file failed; warns about the skipped ones."""
    keep, skipped = decoded.keep, decoded.skipped
    if skipped and on_bad_file == "error":
        # every bad file at once, so one pass over the folder fixes them all
        listing = "\n".join(f"  {s.path}: {s.reason}" for s in skipped)
        raise DataError(
            f"cannot read {len(skipped)} image file(s) in {source} (data.on_bad_file: error; set "
            f"it to skip to skip unreadable files and report them):\n{listing}"
        )
    if not keep.any():
        raise DataError(
            f"no readable images in {source}: all {len(labels)} files failed to decode; "
            f"first problems: {_name_some(skipped)}"
        )
    if skipped:
        warn_skipped(skipped, decoded.skipped_labels, class_names, source)
    # A class whose every file failed would silently vanish from training: refuse that.
    # (A class with no rows at all, e.g. in one Parquet shard of many, is the caller's choice.)
    present = np.bincount(labels, minlength=len(class_names))
    kept = np.bincount(labels[keep], minlength=len(class_names))
    empty = [name for c, name in enumerate(class_names) if present[c] and not kept[c]]
    if empty:
        raise DataError(
            f"{source}: class(es) {', '.join(map(repr, empty))} have no readable images "
            f"(every file was skipped); fix or remove them. First problems: {_name_some(skipped)}"
        )
    return keep


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
    """The first :data:`WARN_NAMES` skipped files with their reasons, and how many more."""
    shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:WARN_NAMES])
    more = len(skipped) - WARN_NAMES
    return shown + (f"; and {more} more" if more > 0 else "")
