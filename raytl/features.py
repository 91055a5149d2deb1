"""Frozen-backbone features, computed once and shared by every trial that only trains a head.

A linear probe (and lp_ft's probe phase) pushes the same images through the same frozen backbone
in every epoch of every trial. Its pooled pre-logit features depend only on the backbone, its
weights, the image size, the data and the preprocessing, so raytl computes them once per such
key (eval mode, no augmentation), stores them as Parquet on the experiment's storage, and gives
them to trials through Ray's object store.

Safety rules: the key hashes everything that changes the features; a cache is written to a
temporary name and renamed into place, so a reader never sees a half-written file; on a local or
shared POSIX folder an exclusive file lock makes concurrent producers compute it once (on a URI
such as s3:// the search driver is the single producer). Reading needs no pickle: Arrow only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import timm
import torch

from raytl.config import SpaceConfig
from raytl.console import bar
from raytl.data.dataset import ImageData
from raytl.data.stream import STREAM_MEMORY_SHARE, total_memory
from raytl.feature_pool import extract_features
from raytl.feature_rows import (
    FEATURES_FILE,
    FeatureCacheError,
    FeatureFile,
    fill_matrix,
    open_cache,
    written_key,
)
from raytl.models import create_model, package_weights_path, pooled_features
from raytl.preprocess import BatchPreparer, Preprocessing, default_device, preprocessing_for
from raytl.storage import Storage, file_lock, join_location
from raytl.strategies import STRATEGIES

CACHE_VERSION = 1  # bump when the way features are computed changes


@dataclass(frozen=True)
class FeatureKey:
    """Everything the pooled features depend on; its digest names the cache entry."""

    backbone: str
    weights: str  # identity of the weights: a file's sha256, or the hub tag
    image_size: int
    data: str  # ImageData.fingerprint
    preprocessing: str
    depth: str = "pooled"  # the whole backbone, pre-logits
    version: int = CACHE_VERSION

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def weights_identity(backbone: str, pretrained: str) -> str:
    """What identifies the weights a backbone is created with (None-like for random weights)."""
    if pretrained == "package":
        path = str(package_weights_path(backbone))
    elif pretrained == "hub":
        cfg = timm.models.get_pretrained_cfg(backbone)
        tag = (cfg.hf_hub_id or cfg.url or "default") if cfg is not None else "default"
        return f"hub:{backbone}:{tag}"
    elif pretrained == "none":
        return "random"
    else:
        path = pretrained
    stat = os.stat(path)
    return f"sha256:{_file_sha256(str(path), stat.st_size, stat.st_mtime_ns)}"


def feature_key(backbone: str, pretrained: str, data: ImageData, pre: Preprocessing) -> FeatureKey:
    return FeatureKey(
        backbone=backbone,
        weights=weights_identity(backbone, pretrained),
        image_size=pre.image_size,
        data=data.fingerprint,
        preprocessing=json.dumps(asdict(pre), sort_keys=True),
    )


# ---------------------------------------------------------------------------------------------------
# Storage


def entry_path(root: str, key: FeatureKey) -> str:
    """Where the cache for ``key`` lives under ``root``: ``ROOT/<digest>/features.parquet``."""
    return join_location(root, key.digest(), FEATURES_FILE)


def read_features(root: str, key: FeatureKey) -> np.ndarray | None:
    """The cached (N, D) float32 matrix, or None when there is no complete cache (read a batch
    of rows at a time into one matrix: the process holds the matrix and one batch)."""
    shape = cached_shape(root, key)
    if shape is None:
        return None
    matrix = np.empty(shape, dtype=np.float32)
    return matrix if fill_matrix(open_cache(root, key.digest()), matrix) else None


def write_features(root: str, key: FeatureKey, features: np.ndarray) -> str:
    """Write a whole matrix as the cache for ``key`` (:func:`write_feature_chunks`)."""
    return write_feature_chunks(root, key, iter([features]))[0]


def write_feature_chunks(
    root: str, key: FeatureKey, chunks: Iterator[np.ndarray]
) -> tuple[str, int, int]:
    """Write the cache from consecutive row chunks, one Parquet row group each, to a temporary
    name renamed into place when complete (never half-visible); returns its path and shape."""
    metadata = {"raytl_key": json.dumps(asdict(key), sort_keys=True)}
    shape = [0, 0]

    def fill(where: Any) -> None:
        writer = None
        try:
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=np.float32)
                rows = np.arange(shape[0], shape[0] + len(chunk), dtype=np.int64)
                column = pa.FixedSizeListArray.from_arrays(
                    pa.array(chunk.reshape(-1)), chunk.shape[1]
                )
                table = pa.table({"row": rows, "features": column})
                if writer is None:
                    writer = pq.ParquetWriter(where, table.schema.with_metadata(metadata))
                writer.write_table(table, row_group_size=len(chunk))
                shape[:] = [shape[0] + len(chunk), chunk.shape[1]]
        finally:
            if writer is not None:
                writer.close()

    path = Storage(root).write_streamed(f"{key.digest()}/{FEATURES_FILE}", fill)
    return path, shape[0], shape[1]


def cached_shape(root: str, key: FeatureKey) -> tuple[int, int] | None:
    """The (rows, width) of a complete cache for ``key``, from its footer alone; else None (a
    digest collision or a hand-edited folder is never trusted)."""
    if not Storage(root).is_file(key.digest(), FEATURES_FILE):
        return None
    parquet = open_cache(root, key.digest())
    if written_key(parquet) != asdict(key):
        return None
    return parquet.metadata.num_rows, parquet.schema_arrow.field("features").type.list_size


@contextlib.contextmanager
def producer_lock(root: str, key: FeatureKey) -> Iterator[None]:
    """An exclusive lock per key on a local or shared POSIX folder; a no-op for URIs."""
    storage = Storage(root)
    if not storage.is_local:
        yield
        return
    folder = Path(storage.path(key.digest()))
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".lock"):
        yield


@dataclass
class CacheResult:
    features: np.ndarray
    key: FeatureKey
    computed: bool  # False: read from an existing cache
    seconds: float


def ensure_features(
    root: str,
    backbone: str,
    pretrained: str,
    data: ImageData,
    image_size: int,
    device: torch.device | None = None,
) -> CacheResult:
    """Read the features for this key, or compute and store them (once, under the lock)."""
    started = time.perf_counter()
    device = device or default_device()
    model = create_model(backbone, len(data.class_names), pretrained)
    pre = preprocessing_for(model, image_size)
    key = feature_key(backbone, pretrained, data, pre)
    cached = read_features(root, key)
    if cached is not None:
        return CacheResult(cached, key, False, time.perf_counter() - started)
    with producer_lock(root, key):
        cached = read_features(root, key)  # another producer may have finished meanwhile
        if cached is not None:
            return CacheResult(cached, key, False, time.perf_counter() - started)
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        matrix = (
            pooled_features(model, BatchPreparer(pre, device), data.images, device).cpu().numpy()
        )
        write_features(root, key, matrix)
    return CacheResult(matrix, key, True, time.perf_counter() - started)


def cacheable_backbones(config: SpaceConfig) -> list[str]:
    """The backbones whose frozen features some trial of this space can train on: a strategy that
    probes first is among the choices, the weights are pretrained, and the cache is on."""
    if not config.cache or config.model.pretrained == "none":
        return []
    if not any(STRATEGIES[s].probes_first for s in config.options("strategy", "fine_tune")):
        return []
    if config.options("augment", False) == [True]:
        return []
    return [b or config.model.backbone for b in config.options("backbone", None)]


FeatureRefs = dict[str, Any]  # backbone -> ObjectRef of its (N, D) matrix, or its FeatureFile


def driver_key(backbone: str, pretrained: str, data: ImageData, image_size: int) -> FeatureKey:
    """The cache key, without loading weights: the preprocessing is the architecture's (timm's
    pretrained config comes with the model whatever its weights)."""
    model = create_model(backbone, len(data.class_names), "none")
    return feature_key(backbone, pretrained, data, preprocessing_for(model, image_size))


def streams_features(config: SpaceConfig, rows: int, width: int) -> tuple[bool, str]:
    """Whether trials read the cache memory-mapped (:class:`FeatureFile`) instead of through the
    object store, and why: ``data.mode: stream`` streams everything; otherwise the matrix is
    streamed when it would take more than the share of memory ``data.mode: auto`` allows images."""
    size = rows * width * 4
    if config.data.mode != "auto":
        return config.data.mode == "stream", f"data.mode: {config.data.mode}"
    memory = total_memory()
    streamed = size > STREAM_MEMORY_SHARE * memory
    relation = ">" if streamed else "<="
    return streamed, (
        f"{size / 1e9:.2f} GB {relation} {STREAM_MEMORY_SHARE:.0%} of {memory / 1e9:.1f} GB"
    )


def prepare_feature_cache(
    config: SpaceConfig, data: ImageData, data_ref: Any, root: str, echo: Callable[[str], None]
) -> FeatureRefs:
    """Compute (or find) the frozen features once per backbone before any trial starts: the
    driver is the single producer, an actor pool the workers (:mod:`raytl.feature_pool`)."""
    refs: FeatureRefs = {}
    for backbone in cacheable_backbones(config):
        started = time.perf_counter()
        key = driver_key(backbone, config.model.pretrained, data, config.data.image_size)
        actors = 0
        with producer_lock(root, key):
            shape = cached_shape(root, key)
            if shape is None:
                actors, shape = compute_cache(config, data_ref, len(data), backbone, root, key)
        streamed, why = streams_features(config, *shape)
        path = entry_path(root, key)
        if streamed:
            refs[backbone] = FeatureFile(root, key.digest(), asdict(key), *shape)
        else:
            refs[backbone] = ray.remote(num_cpus=0)(held_features).remote(root, key)
        how = f"computed by {actors} actor(s)" if actors else "read"
        where = "memory-mapped on each node" if streamed else "through the object store"
        echo(
            f"feature cache: {backbone} {how} {shape[0]}x{shape[1]} in "
            f"{time.perf_counter() - started:.1f}s ({path}); trials read it {where} ({why})"
        )
    return refs


def compute_cache(
    config: SpaceConfig, data_ref: Any, rows: int, backbone: str, root: str, key: FeatureKey
) -> tuple[int, tuple[int, int]]:
    """Run the actor pool and write its chunks as the cache; the actors used and the shape."""
    resources = (config.resources.cpus_per_worker, config.resources.gpus_per_worker)
    written: list[tuple[str, int, int]] = []
    progress = bar(rows, f"feature cache: {backbone}", "img")

    def write(chunks: Iterator[np.ndarray]) -> None:
        def counted() -> Iterator[np.ndarray]:
            for chunk in chunks:
                progress.update(len(chunk))
                yield chunk

        written.append(write_feature_chunks(root, key, counted()))

    with progress:
        actors = extract_features(
            data_ref,
            rows,
            backbone,
            config.model.pretrained,
            config.data.image_size,
            resources,
            write,
        )
    _, n, width = written[0]
    return actors, (n, width)


def held_features(root: str, key: FeatureKey) -> np.ndarray:
    """The Ray task that puts a held cache into the object store (the driver never holds it)."""
    matrix = read_features(root, key)
    if matrix is None:
        raise FeatureCacheError(f"{entry_path(root, key)}: the feature cache is gone or changed")
    return matrix
