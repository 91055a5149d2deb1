"""How trials read the frozen-feature cache: held in the object store, or memory-mapped.

A cache whose (N, D) matrix fits comfortably in memory travels through Ray's object store: one
copy per node, read zero-copy by every trial there. One that does not (or a search that asked
``data.mode: stream``) is a :class:`FeatureFile`: each node turns the Parquet cache, row group by
row group, into one local ``.npy`` under Ray's session folder and memory-maps it, so the page cache
holds what the node's trials touch and reclaims it under pressure, and no process holds the
matrix. A unit then reads its features through :class:`FeatureRows`: its rows copied once onto
its device (held), or each batch's rows read from the map (streamed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raytl.errors import RaytlError
from raytl.preprocess import to_device
from raytl.storage import Storage, atomic_write, file_lock, join_location

FEATURES_FILE = "features.parquet"  # the cache entry's file, in its key's folder
COPY_BATCH_ROWS = 4096  # rows converted at a time into a node's memory-mapped copy


class FeatureCacheError(RaytlError, ValueError):
    """The cache on storage is not the one the search computed (changed or removed under it)."""


def local_folder() -> Path:
    """Where this node keeps memory-mapped copies: Ray's session folder, which goes with Ray's
    temp folder (a FeatureFile exists only in a search, so only in a process connected to Ray)."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)  # set in a connected process
    if node is None:
        raise FeatureCacheError("a memory-mapped feature cache is read only inside a Ray search")
    folder = Path(node.get_session_dir_path()) / "raytl_features"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class FeatureFile:
    """A streamed feature cache: where its entry lives (the cache's root, the key's digest), its
    key (a dict of :class:`~raytl.features.FeatureKey`'s fields) and its shape. Pickles small."""

    root: str
    digest: str
    key: dict[str, Any]
    rows: int
    width: int

    def open(self) -> np.ndarray:
        """This node's memory-mapped (rows, width) float32 matrix, copied from storage once."""
        target = local_folder() / f"{self.digest}.npy"
        if not target.exists():
            with file_lock(target.with_suffix(".lock")):
                if not target.exists():  # another trial on this node may have copied it
                    atomic_write(target, self._copy_to)
        matrix = np.load(target, mmap_mode="r")
        if matrix.shape != (self.rows, self.width):
            raise FeatureCacheError(f"{target}: shape {matrix.shape}, expected {self.shape}")
        return matrix

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.width

    @property
    def path(self) -> str:
        """The Parquet file on storage (as messages name it)."""
        return join_location(self.root, self.digest, FEATURES_FILE)

    def _copy_to(self, local: str) -> None:
        parquet = open_cache(self.root, self.digest)
        if written_key(parquet) != self.key or parquet.metadata.num_rows != self.rows:
            raise FeatureCacheError(
                f"{self.path}: no longer the feature cache this search computed"
            )
        matrix = np.lib.format.open_memmap(local, "w+", np.float32, self.shape)
        if not fill_matrix(parquet, matrix):
            raise FeatureCacheError(f"{self.path}: its rows are not in order")
        matrix.flush()
        del matrix


def open_cache(root: str, digest: str) -> pq.ParquetFile:
    """The Parquet file of the cache entry ``digest`` under ``root`` (its footer read)."""
    storage = Storage(root)
    return pq.ParquetFile(storage.path(digest, FEATURES_FILE), filesystem=storage.fs)


def written_key(parquet: pq.ParquetFile) -> Any:
    """The key the cache file was written under (a dict), or None."""
    return json.loads((parquet.schema_arrow.metadata or {}).get(b"raytl_key", b"null"))


def fill_matrix(parquet: pq.ParquetFile, matrix: np.ndarray) -> bool:
    """Copy the cache's rows into ``matrix`` a batch at a time (never the whole table at once);
    False when its rows are not exactly 0..N-1 in order."""
    offset = 0
    for batch in parquet.iter_batches(COPY_BATCH_ROWS, columns=["row", "features"]):
        rows = batch.column(0).to_numpy()
        if not np.array_equal(rows, np.arange(offset, offset + len(rows))):
            return False
        values = batch.column(1).flatten().to_numpy(zero_copy_only=False)
        matrix[offset : offset + len(rows)] = values.reshape(len(rows), -1)
        offset += len(rows)
    return offset == len(matrix)


def resolve_features(handle: Any) -> np.ndarray | None:
    """A trial's or refit's feature matrix from what the search gave it: an ObjectRef (held), a
    :class:`FeatureFile` (memory-mapped), an array (a resolved task argument), or None."""
    if handle is None or isinstance(handle, np.ndarray):
        return handle
    if isinstance(handle, FeatureFile):
        return handle.open()
    import ray

    return ray.get(handle)


class FeatureRows:
    """The cached features of a unit's rows (``indices``, in order), as it trains and evaluates:
    held on its device, or (a memory-mapped matrix) read batch by batch."""

    def __init__(
        self, matrix: np.ndarray | torch.Tensor, indices: np.ndarray, device: torch.device
    ) -> None:
        self.indices, self.device = np.asarray(indices), device
        self.streamed = isinstance(matrix, np.memmap)
        self.matrix = matrix
        self.held: torch.Tensor | None = None
        if isinstance(matrix, torch.Tensor):  # computed by the unit itself: already its rows
            self.held = matrix
        elif not self.streamed:
            rows = torch.from_numpy(np.ascontiguousarray(matrix[self.indices]))
            self.held = rows.to(device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, positions: np.ndarray) -> torch.Tensor:
        """The features of ``indices[positions]`` on the device."""
        if self.held is not None:
            return self.held[torch.from_numpy(positions).to(self.device)]
        rows = np.asarray(self.matrix[self.indices[positions]])
        return to_device(torch.from_numpy(rows), self.device)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Every row in order: at once when held, else ``size`` rows at a time."""
        if self.held is not None:
            yield self.held
            return
        for start in range(0, len(self.indices), size):
            yield self.batch(np.arange(start, min(start + size, len(self.indices))))
