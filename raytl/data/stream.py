"""Streamed images: the process holds a row index, pixels are decoded a batch at a time.

:class:`StreamedImages` stands where :class:`~raytl.data.dataset.ImageData` keeps its ``uint8``
array when the data does not fit memory (``data.mode: stream``). It holds, per row, where the
encoded bytes are (a file, or a row of a Parquet shard on any pyarrow filesystem) and their
digest; indexing it (``images[rows]``) reads and decodes those rows on a thread pool, resized to
the search's image size, and returns the same ``(k, H, W, 3)`` array the in-memory path would
hold. It pickles as its index, so the object store, every trial and every worker get the index
and decode only what they train on: memory is bounded by the batches in flight, not by the
dataset. Ray Train workers run it inside the per-unit trainer, whose prefetch thread decodes the
next batches while the current one trains (docs/design.md, "Streaming", says why this engine and
not Ray Data's).

Parquet shards are read one row group at a time, so a streamed epoch over Parquet visits its
rows block-shuffled (:meth:`StreamedImages.read_order`): row groups in random order, rows
shuffled within windows of a few groups, and a small cache of encoded row groups.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytl.data.budget import PixelBudget
from raytl.data.images import DECODE_PIXEL_BUDGET, UnreadableImage, decode_image
from raytl.errors import RaytlError, first_line

STREAM_MEMORY_SHARE = 0.25
"""``data.mode: auto`` streams when the decoded images would take more than this share of the
machine's memory (the driver's; a worker holds the same array in memory mode)."""

MODES = ("auto", "memory", "stream")
WINDOW_BLOCKS = 16  # Parquet row groups whose rows are shuffled together in a streamed epoch
CACHE_BLOCKS = 24  # encoded row groups a process keeps (the window and the prefetched batches)
_BUDGET = PixelBudget(DECODE_PIXEL_BUDGET)  # pixels decoded at once by this process's streams


class StreamReadError(RaytlError, ValueError):
    """A row that passed the index's checks cannot be read or decoded now (named, with why)."""


def total_memory() -> int:
    """This machine's physical memory in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def choose_mode(
    requested: str, rows: int, image_size: int, memory: int | None = None
) -> tuple[str, str]:
    """``memory`` or ``stream`` for ``rows`` images at ``image_size``, and the sentence saying why."""
    decoded = rows * image_size * image_size * 3
    memory = total_memory() if memory is None else memory
    size = f"{rows} images decoded at {image_size} px take {decoded / 1e9:.2f} GB"
    if requested != "auto":
        return requested, f"data.mode: {requested} ({size})"
    share = f"{STREAM_MEMORY_SHARE:.0%} of this machine's {memory / 1e9:.1f} GB"
    if decoded > STREAM_MEMORY_SHARE * memory:
        return "stream", f"data.mode auto: stream ({size} > {share})"
    return "memory", f"data.mode auto: memory ({size} <= {share})"


_T = TypeVar("_T")


def map_in_shares(
    pool: ThreadPoolExecutor, threads: int, fn: Callable[[int], _T], count: int
) -> list[_T]:
    """``[fn(i) for i in range(count)]`` on ``threads`` of ``pool``'s threads, one task per
    thread (every ``threads``-th position): a task per position spent more on the pool's
    hand-offs and the GIL than the threads gained (64 JPEGs decoded to 48 px: 227 us an
    image with a task each, 211 on one thread, 118 in two shares; docs/benchmarks.md)."""
    parts = list(pool.map(lambda k: [fn(i) for i in range(k, count, threads)], range(threads)))
    return [parts[i % threads][i // threads] for i in range(count)]


MapPositions = Callable[[Callable[[int], _T], int], list[_T]]
"""How a batch's rows are read: ``map_in_shares`` bound to a stream's pool and threads."""


@dataclass(frozen=True, eq=False)
class FileRows:
    """Rows that are files: local paths, or paths on ``fs`` (an image folder on a URI). Row
    ``i`` is the file ``base + paths[i]``; the paths are one Arrow array (strings, or a local
    folder's file-system bytes), which pickles as a few buffers (no Python object per file)."""

    paths: pa.Array
    fs: pafs.FileSystem | None = None
    prefix: str = ""  # "s3://" for paths on a URI's filesystem: how messages name them
    base: str = ""  # a local folder's root and separator, when the paths are relative to it

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray) -> FileRows:
        """The rows at ``rows``: positions, or a mask of them."""
        rows = np.asarray(rows)
        if rows.dtype == bool and rows.all():  # every row: the same array, not a copy
            return self
        picked = self.paths.filter(rows) if rows.dtype == bool else self.paths.take(rows)
        return FileRows(picked, self.fs, self.prefix, self.base)

    def path(self, row: int) -> str:
        value = self.paths[row].as_py()  # a local folder's are file-system bytes
        return self.base + (os.fsdecode(value) if isinstance(value, bytes) else value)

    def name(self, row: int) -> str:
        return self.prefix + self.path(row)

    def read(self, rows: np.ndarray, map_positions: MapPositions) -> list[bytes | Exception]:
        rows_list = rows.tolist()
        return map_positions(lambda i: self._read_one(rows_list[i]), len(rows))

    def _read_one(self, row: int) -> bytes | Exception:
        try:
            if self.fs is None:
                with open(self.path(row), "rb") as file:
                    return file.read()
            with self.fs.open_input_stream(self.path(row)) as stream:
                return stream.read()
        except (OSError, pa.ArrowException) as exc:
            return exc


@dataclass(frozen=True, eq=False)
class ShardRows:
    """Rows of Parquet shards: row ``i`` is row ``row[i]`` of the row group
    ``row_groups[block[i]]`` (a shard and a row group in it); row groups are read whole
    (Parquet's unit of reading) and kept in a small per-process cache of encoded bytes; each
    shard's footer is read once per process, not once per row group. Eight bytes a row: the
    table of row groups is one entry per group, not per row."""

    files: tuple[str, ...]
    fs: pafs.FileSystem
    row_groups: np.ndarray  # (groups, 2) int32: shard, row group within it
    block: np.ndarray  # int32 per row: its row group, a row of row_groups
    row: np.ndarray  # int32 per row (int64 for a row group of 2**31 rows): the row in its group
    prefix: str = ""
    _cache: OrderedDict[tuple[int, int], pa.Array] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _footers: dict[int, pq.FileMetaData] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.row)

    def __getstate__(self) -> dict[str, Any]:  # the index travels; the caches and lock do not
        return {k: v for k, v in self.__dict__.items() if k not in _PER_PROCESS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _cache=OrderedDict(), _lock=threading.Lock(), _footers={})

    def subset(self, rows: np.ndarray) -> ShardRows:  # the footers read so far are shared
        return ShardRows(
            self.files,
            self.fs,
            self.row_groups,
            self.block[rows],
            self.row[rows],
            self.prefix,
            _footers=self._footers,
        )

    def name(self, row: int) -> str:
        shard, group = self.row_groups[self.block[row]]
        return f"{self.prefix}{self.files[shard]}#group={group},row={self.row[row]}"

    def blocks(self) -> np.ndarray:
        """One id per row group, for the block-shuffled order."""
        return self.block

    def _block(self, shard: int, group: int) -> pa.Array:
        key = (shard, group)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        file, footer = self.files[shard], self._footers.get(shard)
        try:
            with pq.ParquetFile(file, filesystem=self.fs, metadata=footer) as reader:
                column = reader.read_row_group(group, columns=["image"]).column("image")
                self._footers.setdefault(shard, reader.metadata)
        except (OSError, pa.ArrowException) as exc:
            raise StreamReadError(
                f"{self.prefix}{file}: row group {group} cannot be read mid-stream "
                f"({first_line(exc)}); the shard changed or is damaged since the search started"
            ) from None
        block = column.combine_chunks()
        with self._lock:
            self._cache[key] = block
            while len(self._cache) > CACHE_BLOCKS:
                self._cache.popitem(last=False)
        return block

    def read(self, rows: np.ndarray, map_positions: MapPositions) -> list[bytes | Exception]:
        out: list[bytes | Exception] = [b""] * len(rows)
        keys = self.block[rows]
        for key in np.unique(keys):
            where = np.flatnonzero(keys == key)
            shard, group = self.row_groups[key]
            block = self._block(int(shard), int(group))
            for i, value in zip(
                where, block.take(pa.array(self.row[rows[where]])).to_pylist(), strict=True
            ):
                out[i] = value or b""
        return out


Rows = FileRows | ShardRows
_PER_PROCESS = ("_cache", "_lock", "_footers")  # ShardRows' fields that never travel


class StreamedImages:
    """Images decoded on demand: ``images[rows]`` is a ``(k, size, size, 3)`` uint8 array.

    ``digests`` (one ``uint64`` per row: the first 8 bytes of its encoded file's 16-byte
    digest, taken when the index was built) identify the data (the fingerprint); the copy
    groups were cut on the whole digest before."""

    streamed = True
    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, rows: Rows, digests: np.ndarray, *, size: int, max_pixels: int) -> None:
        self.rows, self.digests, self.size, self.max_pixels = rows, digests, size, max_pixels
        self.threads = min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._named: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_named")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _pool=None, _named=set())

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"StreamedImages(n={len(self)}, size={self.size}, rows={type(self.rows).__name__})"

    def subset(self, rows: Sequence[int] | np.ndarray) -> StreamedImages:
        """The index of ``rows`` (nothing is read)."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        return StreamedImages(
            self.rows.subset(idx), self.digests[idx], size=self.size, max_pixels=self.max_pixels
        )

    def name(self, row: int) -> str:
        """How messages name row ``row``: its file, or its shard, row group and row."""
        return self.rows.name(row)

    def read_order(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A shuffled order of the positions of ``rows`` that reads well: for files a plain
        permutation; for Parquet the row groups in random order, rows shuffled within windows
        of :data:`WINDOW_BLOCKS` groups (so a batch needs a few cached groups, not one read per
        row; 16 random groups mix classes even in shards written class by class)."""
        if isinstance(self.rows, FileRows):  # any file can be read on its own
            return rng.permutation(len(rows))
        blocks = self.rows.blocks()[np.asarray(rows, dtype=np.int64)]
        unique, inverse = np.unique(blocks, return_inverse=True)
        rank = rng.permutation(len(unique))[inverse]  # each block's place in the epoch
        return np.lexsort((rng.random(len(blocks)), rank // WINDOW_BLOCKS))

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self.take(np.array([int(key)]))[0]
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        return self.take(np.asarray(key))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The decoded rows, in order; a row that fails is a :class:`StreamReadError`."""
        pixels, failed = self._decode(np.asarray(rows, dtype=np.int64).reshape(-1))
        if failed:
            _, row, reason = failed[0]
            raise StreamReadError(
                f"{self.name(row)}: cannot be decoded mid-stream ({reason}); it passed the "
                "checks when the search started, so it changed or is damaged: fix or remove it"
            )
        return pixels

    def take_readable(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The decoded rows that can be read, and their positions in ``rows``: a row that fails
        mid-stream is left out of the batch and named once on stderr (a training step can lose
        an image; an evaluation cannot, and uses :meth:`take`)."""
        pixels, failed = self._decode(np.asarray(rows, dtype=np.int64).reshape(-1))
        kept = np.ones(len(pixels), dtype=bool)
        for position, row, reason in failed:
            kept[position] = False
            if row not in self._named:
                self._named.add(row)
                print(f"raytl: skipped {self.name(row)} mid-stream: {reason}", file=sys.stderr)
        if kept.all():
            return pixels, np.arange(len(pixels))
        if not kept.any():
            _, row, reason = failed[0]
            raise StreamReadError(
                f"no image of a batch could be read mid-stream; the first: {self.name(row)}: "
                f"{reason}"
            )
        return pixels[kept], np.flatnonzero(kept)

    def _decode(self, rows: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        """The rows' pixels, and (position, row, reason) for each that failed."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="raytl-stream")
        map_positions = partial(map_in_shares, self._pool, self.threads)
        pixels = np.empty((len(rows), self.size, self.size, 3), dtype=np.uint8)
        blobs = self.rows.read(rows, map_positions)

        def decode(i: int) -> str | None:
            blob = blobs[i]
            if isinstance(blob, Exception):
                return f"cannot read ({type(blob).__name__}: {first_line(blob)})"
            try:
                pixels[i] = decode_image(
                    blob, size=self.size, max_pixels=self.max_pixels, budget=_BUDGET
                )
            except UnreadableImage as exc:
                return exc.reason
            return None

        reasons = map_positions(decode, len(rows))
        return pixels, [(i, int(rows[i]), r) for i, r in enumerate(reasons) if r is not None]


def is_streamed(images: Any) -> bool:
    """Whether ``images`` is a :class:`StreamedImages` (else an in-memory array)."""
    return bool(getattr(images, "streamed", False))


def rows_of(images: Any, rows: np.ndarray) -> Any:
    """``images[rows]`` for an array; the (unread) index of those rows for a stream."""
    return images.subset(rows) if is_streamed(images) else images[rows]


def epoch_order(images: Any, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The shuffled order of an epoch over ``rows``: a permutation in memory (seeded results
    unchanged), block-shuffled for streamed Parquet (:meth:`StreamedImages.read_order`)."""
    if is_streamed(images):
        return images.read_order(rows, rng)
    return rng.permutation(len(rows))
