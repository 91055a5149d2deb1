"""The frozen-feature cache computed as batch inference by a pool of Ray actors.

Each actor builds the backbone once (on a GPU when the search's workers get one) and turns chunks
of rows into pooled features, decoding a streamed dataset chunk by chunk. The driver hands out
chunks as actors free up (:class:`ray.util.ActorPool`, results in row order) and writes each
result as it arrives as one row group of the cache's Parquet file, so no process holds the whole
(N, D) matrix: an actor holds one chunk's pixels and features, the driver one chunk's features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray
import torch
from ray.util import ActorPool

from raytl.data.dataset import ImageData
from raytl.data.stream import rows_of
from raytl.models import create_model, pooled_features
from raytl.preprocess import BatchPreparer, default_device, preprocessing_for

CHUNK_ROWS = 1024  # rows per actor call and per Parquet row group (a multiple of the 256-row batch)


class FeatureExtractor:
    """One pool member: the backbone in eval mode and the data (from the object store)."""

    def __init__(
        self, data: ImageData, backbone: str, pretrained: str, image_size: int, cpus: float
    ) -> None:
        torch.set_num_threads(max(1, int(cpus)))
        self.data, self.device = data, default_device()
        model = create_model(backbone, len(data.class_names), pretrained)
        self.prepare = BatchPreparer(preprocessing_for(model, image_size), self.device)
        model.to(self.device)
        if self.device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        self.model = model

    def extract(self, start: int, stop: int) -> np.ndarray:
        """Pooled features of rows ``start:stop``, float32."""
        images = rows_of(self.data.images, np.arange(start, stop))
        return pooled_features(self.model, self.prepare, images, self.device).cpu().numpy()


def pool_size(chunks: int, cpus: float, gpus: float, available: dict[str, float]) -> int:
    """Actors that fit in what the cluster has free now (at least one, at most one per chunk)."""
    fit = int(available.get("CPU", 0) // cpus) if cpus else chunks
    if gpus:
        fit = min(fit, int(available.get("GPU", 0) // gpus))
    return max(1, min(chunks, fit))


def extract_features(
    data_ref: Any,
    rows: int,
    backbone: str,
    pretrained: str,
    image_size: int,
    resources: tuple[float, float],
    write: Callable[[Iterator[np.ndarray]], None],
) -> int:
    """Compute the features of ``rows`` rows on an actor pool and give them, chunk by chunk in row
    order, to ``write``; returns the number of actors used. The actors are gone afterwards."""
    cpus, gpus = resources
    chunks = [(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS)]
    actors_wanted = pool_size(len(chunks), cpus, gpus, ray.available_resources())
    actor_class: Any = ray.remote(num_cpus=cpus, num_gpus=gpus)(FeatureExtractor)
    actors = [
        actor_class.remote(data_ref, backbone, pretrained, image_size, cpus)
        for _ in range(actors_wanted)
    ]
    try:
        pool = ActorPool(actors)
        write(pool.map(lambda actor, chunk: actor.extract.remote(*chunk), chunks))
    finally:
        for actor in actors:
            ray.kill(actor)
    return len(actors)
