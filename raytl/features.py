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
import fcntl
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
from raytl.console import wait_for
from raytl.data.dataset import ImageData
from raytl.models import create_model, package_weights_path, pooled_features
from raytl.preprocess import BatchPreparer, Preprocessing, default_device, preprocessing_for
from raytl.storage import Storage, join_location
from raytl.strategies import STRATEGIES

CACHE_VERSION = 1  # bump when the way features are computed changes
FEATURES_FILE = "features.parquet"


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
    """The cached (N, D) float32 matrix, or None when there is no complete cache."""
    storage = Storage(root)
    if not storage.is_file(key.digest(), FEATURES_FILE):
        return None
    table = pq.read_table(storage.path(key.digest(), FEATURES_FILE), filesystem=storage.fs)
    meta = json.loads((table.schema.metadata or {})[b"raytl_key"])
    if meta != asdict(key):  # a digest collision or a hand-edited folder: never trust it
        return None
    column = table.column("features").combine_chunks()
    width = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    rows = table.column("row").to_numpy()
    if not np.array_equal(rows, np.arange(len(rows))):
        return None
    return matrix.astype(np.float32, copy=False)


def write_features(root: str, key: FeatureKey, features: np.ndarray) -> str:
    """Write the cache to a temporary name, then rename it into place (never half-visible)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1])
    table = pa.table(
        {"row": pa.array(np.arange(len(features), dtype=np.int64)), "features": column}
    )
    table = table.replace_schema_metadata({"raytl_key": json.dumps(asdict(key), sort_keys=True)})
    return Storage(root).write(
        f"{key.digest()}/{FEATURES_FILE}", lambda path: pq.write_table(table, path)
    )


@contextlib.contextmanager
def producer_lock(root: str, key: FeatureKey) -> Iterator[None]:
    """An exclusive lock per key on a local or shared POSIX folder; a no-op for URIs."""
    storage = Storage(root)
    if not storage.is_local:
        yield
        return
    folder = Path(storage.path(key.digest()))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


FeatureRefs = dict[str, Any]  # backbone -> ray.ObjectRef of its (N, D) feature matrix


def prepare_feature_cache(
    config: SpaceConfig, data_ref: Any, root: str, echo: Callable[[str], None]
) -> FeatureRefs:
    """Compute (or read) the frozen features once per backbone, before any trial starts (the
    single producer), on a worker-sized Ray task; trials get them through the object store."""
    backbones = cacheable_backbones(config)
    r = config.resources
    task: Any = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, num_returns=2)(
        features_task
    )
    refs = {}
    for backbone in backbones:
        features_ref, info_ref = task.remote(
            root,
            backbone,
            config.model.pretrained,
            data_ref,
            config.data.image_size,
            r.cpus_per_worker,
        )
        info = wait_for(info_ref, f"feature cache: {backbone}")
        echo(
            f"feature cache: {backbone} {'computed' if info['computed'] else 'read'} "
            f"{info['shape'][0]}x{info['shape'][1]} in {info['seconds']:.1f}s ({info['path']})"
        )
        refs[backbone] = features_ref
    return refs


def features_task(
    root: str, backbone: str, pretrained: str, data: ImageData, image_size: int, cpus: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """The Ray task behind :func:`prepare_feature_cache` (``data`` arrives from the object store)."""
    torch.set_num_threads(max(1, int(cpus)))
    result = ensure_features(root, backbone, pretrained, data, image_size)
    return result.features, {
        "computed": result.computed,
        "seconds": result.seconds,
        "shape": result.features.shape,
        "path": entry_path(root, result.key),
    }
