"""Look at a data source before training on it.

``inspect_source`` decodes every file (it never stops at the first bad one) so that a user
sees all unreadable files, per class, in one report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from raytl.data.dataset import DataError, SkippedFile
from raytl.data.images import DEFAULT_MAX_PIXELS
from raytl.data.sources import SOURCES, load_data
from raytl.data.sources.decode import DecodedImage, DecodeTask, decode_task, ordered_map
from raytl.data.sources.imagefolder import folder_tasks, scan_imagefolder
from raytl.data.sources.parquet import parquet_tasks
from raytl.data.sources.shards import scan_parquet


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
        duplicates: Readable files byte-identical to an earlier one (None: not checked, for
            the built-in sets); ``duplicate_files`` pairs each with the file it copies.
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
    duplicates: int | None = None
    duplicate_files: list[tuple[str, str]] = field(default_factory=list)

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
        if self.duplicates is not None:
            lines.append(
                f"Duplicates: {self.duplicates} file(s) byte-identical to another file "
                "(a copy on both sides of a split inflates the test score)"
            )
            lines.extend(f"  {copy} = {original}" for copy, original in self.duplicate_files)
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


@dataclass
class _Tally:
    """What decoding every task found, gathered in task order."""

    readable: Counter[int] = field(default_factory=Counter)
    bad: Counter[int] = field(default_factory=Counter)
    skipped: list[SkippedFile] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    originals: dict[bytes, str] = field(default_factory=dict)
    copies: list[tuple[str, str]] = field(default_factory=list)

    def add(self, task: DecodeTask, result: tuple[int, int, bytes] | SkippedFile) -> None:
        if isinstance(result, SkippedFile):
            self.skipped.append(result)
            self.bad[task.label] += 1
            return
        height, width, digest = result
        self.readable[task.label] += 1
        self.sizes.add((height, width))
        original = self.originals.setdefault(digest, task.name)
        if original != task.name:
            self.copies.append((task.name, original))


def _inspect_tasks(
    tasks: list[DecodeTask], class_names: tuple[str, ...], source: str, max_pixels: int
) -> InspectReport:
    """Decode every task at full size, counting readable images and collecting failures."""

    def probe(task: DecodeTask) -> tuple[int, int, bytes] | SkippedFile:
        result = decode_task(task, size=None, max_pixels=max_pixels)
        if not isinstance(result, DecodedImage):
            return result
        height, width = result.pixels.shape[:2]
        return height, width, result.digest

    tally = _Tally()
    for task, result in zip(tasks, ordered_map(probe, tasks), strict=True):
        tally.add(task, result)
    readable, bad = tally.readable, tally.bad
    problems = [
        f"class {name!r} has no readable images"
        for label, name in enumerate(class_names)
        if not readable[label]
    ]
    by_area = sorted(tally.sizes, key=lambda hw: (hw[0] * hw[1], hw))
    return InspectReport(
        source=source,
        class_counts={name: readable[label] for label, name in enumerate(class_names)},
        skipped=tally.skipped,
        skipped_per_class={
            name: bad[label] for label, name in enumerate(class_names) if bad[label]
        },
        total=sum(readable.values()),
        image_shape=(*by_area[0], 3) if len(tally.sizes) == 1 else None,
        size_range=(by_area[0], by_area[-1]) if tally.sizes else None,
        problems=problems,
        duplicates=len(tally.copies),
        duplicate_files=tally.copies,
    )
