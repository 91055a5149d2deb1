"""Size and speed beside accuracy: each backbone's parameter count and inference latency.

Pretrained models can be too large or too slow for where they will run, so a search records, for
every backbone it tries, the parameters of the model it trains (its head sized to the task) and
the median latency of a forward pass at batch 1 and batch 64 at the search's image size, in eval
mode on the device its workers train on (a Ray task shaped like one worker, so its CPU threads or
GPU are theirs). Once per backbone: the strategy changes what trains, not what a prediction
costs. ``search.max_latency_ms`` and ``search.max_params`` then bound the pick (and the refit).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import ray
import torch

from raytl.config import SpaceConfig
from raytl.console import wait_for
from raytl.models import create_model
from raytl.preprocess import default_device

BATCHES = (1, 64)
REPEATS = 5  # timed passes per batch size, after one warm-up pass
COLUMNS = ("params", "latency_ms_batch1", "latency_ms_batch64")


@torch.no_grad()
def measure(backbone: str, classes: int, image_size: int, threads: int) -> dict[str, float]:
    """Parameters and median forward latency (ms) of ``backbone`` with a ``classes``-way head."""
    torch.set_num_threads(max(1, threads))
    device = default_device()
    model = create_model(backbone, classes, "none").to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    figures: dict[str, float] = {"params": float(sum(p.numel() for p in model.parameters()))}
    for batch in BATCHES:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        times = []
        for i in range(REPEATS + 1):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first pass warms up (allocations, kernel selection)
                times.append((time.perf_counter() - start) * 1000)
        figures[f"latency_ms_batch{batch}"] = statistics.median(times)
    return figures


def measure_backbones(config: SpaceConfig, classes: int) -> dict[str, dict[str, float]]:
    """:func:`measure` for every backbone the space can sample, on worker-shaped Ray tasks."""
    r = config.resources
    task: Any = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(measure)
    backbones = config.options("backbone", config.model.backbone)
    refs = {
        b: task.remote(b, classes, config.data.image_size, int(r.cpus_per_worker))
        for b in backbones
    }
    return {b: wait_for(ref, f"latency: {b}") for b, ref in refs.items()}


def within_limits(row: Any, max_latency_ms: float | None, max_params: float | None) -> bool:
    """Whether a results row's model fits the deployment limits (batch-1 latency, parameters)."""
    if max_latency_ms is not None and not row.get("latency_ms_batch1", 0) <= max_latency_ms:
        return False
    return max_params is None or row.get("params", 0) <= max_params
