"""The training step's feed: one pass's batches as model input on the device, prepared ahead.

A thread (:class:`~raytl.prefetch.Prefetcher`) loads the next two batches while the current one
trains: images gathered, pinned and copied to the device, or rows of memory-mapped features. On a
GPU the thread also augments, resizes and normalises them on a side stream, so the training thread
does nothing but run the model: CPU work there delays the kernels the GPU waits for
(efficientnet_b0 on an H200 trained at 0.77 of its ceiling with the crops drawn in the training
thread, 0.98 without: ``benchmarks/gpu.py``). On a CPU the training thread finishes each batch
itself, since a second thread would compete with the step for the same cores. Either way each
batch's crops and flips come from a generator of its own (``rng_for(step)``), so the result does
not depend on which thread prepared it, nor when.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from raytl.data.stream import is_streamed
from raytl.feature_rows import FeatureRows
from raytl.prefetch import Prefetcher
from raytl.preprocess import BatchPreparer


def finishes_ahead(device: torch.device) -> bool:
    """Whether the prefetch thread also augments and normalises (on a GPU), or the caller does."""
    return device.type == "cuda"


def prefetch_depth(device: torch.device, images: Any, features: FeatureRows | None) -> int:
    """Batches loaded ahead by the feed's thread: none for features already on the device, nor
    for streamed images on a CPU, whose decoding would run on the cores the step is using
    (torch's OpenMP threads then wait for the one the decoder displaced: 0.81-0.83 of the
    in-memory speed, ``benchmarks/stream.py``); they are decoded between steps, on every core."""
    if features is not None:
        return 2 if features.streamed else 0
    return 0 if device.type != "cuda" and is_streamed(images) else 2


@contextmanager
def train_batches(
    prepare: BatchPreparer,
    images: Any,
    rows: np.ndarray,
    labels: torch.Tensor,
    batches: list[np.ndarray],
    features: FeatureRows | None,
    augment: bool,
    rng_for: Callable[[int], np.random.Generator],
) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """``(x, y)`` on ``prepare``'s device for each of ``batches`` (positions into ``rows`` and
    ``labels``): model input from ``images[rows[batch]]``, or ``features``' rows when given (a
    probe on cached features). A streamed row that fails to decode is left out of its batch."""
    ahead_finish = finishes_ahead(prepare.device)

    def finish(x: torch.Tensor, step: int) -> torch.Tensor:  # draws nothing from torch
        return prepare.finish(x, augment, rng_for(step))

    def load(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batches[step]
        if features is not None:
            return features.batch(batch), prepare.to_device(labels[batch])
        x, kept = prepare.load_rows(images, rows[batch])
        return finish(x, step) if ahead_finish else x, prepare.to_device(labels[batch][kept])

    def finished(loaded: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[Any]:
        for step, (x, y) in enumerate(loaded):
            yield (x if features is not None or ahead_finish else finish(x, step)), y

    depth = prefetch_depth(prepare.device, images, features)
    with Prefetcher(range(len(batches)), load, prepare.device, depth=depth) as loaded:
        yield finished(iter(loaded))
