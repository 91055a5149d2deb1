"""The GPU feed: raytl's per-unit trainer against the same model on tensors already on the device.

    python benchmarks/gpu.py              # a GPU: 224 px, efficientnet_b0 and resnet50, bf16
    python benchmarks/gpu.py --small      # CPU-sized: 64 px, efficientnet_lite0 and resnet18
    PYTHONPATH=. python benchmarks/gpu.py # where raytl is not installed (a bare GPU machine)

For each backbone (timm, random weights: raytl's ``pretrained: none``) it times two loops in one
process on one model: raytl's ``UnitTrainer.run_epoch`` (fine_tune, every block trainable, the
real path: real images stored as uint8 ``(N, H, W, 3)`` in memory, indexed per batch, pinned,
copied and augmented on the device, bf16 autocast and channels_last on a GPU) and the ceiling,
the same model and optimizer stepping on one synthetic batch already on the device (forward,
backward, optimizer step, nothing else). raytl / ceiling is the share of the device's speed that
the feed keeps; the goal on a GPU is >= 0.85. Without a GPU it runs small (as ``--small``).

Imports no Ray and no Optuna (a GPU machine may hold only torch, torchvision, timm, numpy, pyarrow,
tensorboard and scikit-learn). Prints a table and writes the "## GPU feed" section of
docs/benchmarks.md (``--no-write``: print only). Not part of the test suite's figures: speed is
measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## GPU feed"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

if importlib.util.find_spec("raytl") is None:  # a bare GPU machine: the working tree, uninstalled
    sys.path.insert(0, str(REPO))
from raytl.data import load_data  # noqa: E402
from raytl.data.dataset import ImageData  # noqa: E402
from raytl.models import create_model, pooled_features, timm_api  # noqa: E402
from raytl.preprocess import BatchPreparer, preprocessing_for  # noqa: E402
from raytl.space import Hyperparameters  # noqa: E402
from raytl.train_feed import train_batches  # noqa: E402
from raytl.unit import UnitTrainer  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One run's size: what a GPU gets, and what 2 CPU cores finish in under a minute."""

    name: str
    backbones: tuple[str, ...]
    image_size: int
    batch: int
    steps: int  # timed steps per measurement (after `warmup` untimed ones)
    warmup: int
    repeats: int  # raytl and the ceiling alternate this often; the median counts
    stored: int  # real images held in memory (the batches index them with repetition)


GPU = Setting("GPU", ("efficientnet_b0", "resnet50"), 224, 256, 40, 10, 3, 4096)
SMALL = Setting("CPU, small", ("efficientnet_lite0", "resnet18"), 64, 32, 6, 2, 2, 512)


def real_images(count: int, size: int) -> ImageData:
    """Real photographs-like images at ``size`` px: Fashion-MNIST when the machine has it, else
    scikit-learn's digits, upscaled (bilinear) to ``size`` and stored as uint8 RGB."""
    if FASHION_MNIST.is_dir():
        data = load_data("fashion-mnist", path=str(FASHION_MNIST), limit=count, seed=0)
    else:
        data = load_data("digits")
    x = torch.from_numpy(data.images[:count]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    source = f"{data.source.split(':')[0]} upscaled to {size} px"
    return ImageData(images, data.labels[:count], data.class_names, source)


class StepClock:
    """A ``progress`` callback that times steps ``warmup + 1 .. last`` of an epoch (synchronising
    the device at both ends, so queued GPU work is counted)."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.start = self.end = 0.0

    def __call__(self, step: int, total: int) -> None:
        if step == self.warmup or step == total:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if step == self.warmup:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()


def raytl_rate(trainer: UnitTrainer, setting: Setting) -> float:
    """Images/s of one of raytl's training epochs (its steps after the warm-up ones)."""
    clock = StepClock(trainer.device, setting.warmup)
    trainer.run_epoch(progress=clock)
    return setting.steps * setting.batch / (clock.end - clock.start)


def ceiling_rate(trainer: UnitTrainer, setting: Setting, classes: int) -> float:
    """Images/s of the same model and optimizer on one synthetic batch already on the device."""
    device, size = trainer.device, setting.image_size
    x = torch.randn(setting.batch, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (setting.batch,), device=device)
    optimizer = trainer.optimizer
    assert optimizer is not None  # run_epoch made it
    trainer.model.train()
    clock = StepClock(device, setting.warmup)
    total = setting.warmup + setting.steps
    for step in range(1, total + 1):
        with torch.autocast("cuda", dtype=trainer.amp_dtype, enabled=device.type == "cuda"):
            loss = F.cross_entropy(trainer.forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.step(optimizer)
        trainer.scaler.update()
        clock(step, total)
    return setting.steps * setting.batch / (clock.end - clock.start)


def feed_rate(trainer: UnitTrainer, setting: Setting) -> float:
    """Images/s of raytl's feed alone: the trainer's own ``train_batches`` (gather, pin, copy,
    augment on the device, 2 batches ahead in a thread), with no model: the most the feed could
    give it."""
    steps = setting.warmup + setting.steps
    rows = np.arange(steps * setting.batch) % len(trainer.data.labels)
    labels = torch.from_numpy(trainer.data.labels[rows])
    batches = np.split(np.arange(len(rows)), steps)
    feed = (trainer.data.images, rows, labels, batches, None, True, np.random.default_rng)
    clock = StepClock(trainer.device, setting.warmup)
    with train_batches(trainer.prepare, *feed) as loaded:
        for step, _ in enumerate(loaded, 1):
            clock(step, len(batches))
    return setting.steps * setting.batch / (clock.end - clock.start)


def measure(backbone: str, data: ImageData, setting: Setting, compile: bool) -> dict[str, object]:
    steps = setting.warmup + setting.steps
    hp = Hyperparameters(
        strategy="fine_tune",
        backbone=backbone,
        freeze_depth=0,
        batch_size=setting.batch,
        epochs=1 + setting.repeats,
        augment=True,
    )
    train_idx = np.arange(steps * setting.batch) % len(data.labels)  # exactly `steps` batches
    trainer = UnitTrainer(
        hp,
        data,
        train_idx,
        np.arange(0),  # nothing to validate: training speed only
        pretrained="none",
        image_size=setting.image_size,
        seed=0,
        compile=compile,
    )
    raytl_rate(trainer, setting)  # warm-up: kernels chosen, memory cached, compiled if asked
    raytl, ceiling, feed = [], [], []
    for _ in range(setting.repeats):  # alternate, so drift in the machine hits both alike
        raytl.append(raytl_rate(trainer, setting))
        ceiling.append(ceiling_rate(trainer, setting, len(data.class_names)))
        feed.append(feed_rate(trainer, setting))
    r, c = statistics.median(raytl), statistics.median(ceiling)
    amp = "bf16" if trainer.amp_dtype == torch.bfloat16 else "fp16 with loss scaling"
    return {
        "backbone": backbone,
        "raytl": r,
        "ceiling": c,
        "ratio": r / c,
        "feed": statistics.median(feed),
        "amp": amp,
    }


def measure_features(backbone: str, data: ImageData, setting: Setting) -> dict[str, object]:
    """The feature cache's batch inference as one of its actors runs it (``pooled_features`` on
    held uint8 rows: copied ahead, bf16, channels_last on a GPU) against the same forward on one
    synthetic batch already on the device, both in eval mode without gradients."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = create_model(backbone, len(data.class_names), "none").to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    prepare = BatchPreparer(preprocessing_for(model, setting.image_size), device)
    rows = np.arange(setting.steps * setting.batch) % len(data.labels)
    images = data.images[rows]  # as many rows as the timed training steps see
    x = torch.randn(setting.batch, 3, setting.image_size, setting.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def ceiling() -> None:
        for _ in range(setting.steps):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                api = timm_api(model)
                api.forward_head(api.forward_features(x), pre_logits=True).float()

    def timed(run: Callable[[], object]) -> float:
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        return len(rows) / (time.perf_counter() - start)

    def raytl() -> object:
        return pooled_features(model, prepare, images, device, batch=setting.batch)

    timed(raytl), timed(ceiling)  # warm-up
    rates = [(timed(raytl), timed(ceiling)) for _ in range(setting.repeats)]
    r, c = statistics.median(a for a, _ in rates), statistics.median(b for _, b in rates)
    return {"backbone": backbone, "raytl": r, "ceiling": c, "ratio": r / c}


def machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU only"
    processor = platform.processor() or platform.machine()
    return f"{name}; {processor}, {torch.get_num_threads()} torch threads"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + (" with uncommitted changes" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git
        return os.environ.get("RAYTL_COMMIT", "unknown (no git checkout)")


def table(rows: list[dict[str, object]], setting: Setting) -> list[str]:
    lines = [
        "| backbone | image px | batch | raytl img/s | ceiling img/s | raytl / ceiling "
        "| feed alone img/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['backbone']} | {setting.image_size} | {setting.batch} | {row['raytl']:.0f} "
            f"| {row['ceiling']:.0f} | {row['ratio']:.2f} | {row['feed']:.0f} |"
        )
    return lines


def feature_table(rows: list[dict[str, object]], setting: Setting) -> list[str]:
    lines = [
        "| backbone | image px | batch | cache img/s | ceiling img/s | cache / ceiling |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['backbone']} | {setting.image_size} | {setting.batch} | {row['raytl']:.0f} "
            f"| {row['ceiling']:.0f} | {row['ratio']:.2f} |"
        )
    return lines


def section(
    rows: list[dict[str, object]],
    features: list[dict[str, object]],
    setting: Setting,
    device: torch.device,
    data: str,
) -> str:
    gpu = device.type == "cuda"
    lines = [
        f"{HEADING} (`benchmarks/gpu.py`)",
        "",
        f"One run, {time.strftime('%Y-%m-%d')}, {setting.name}. Device: {machine(device)}; torch "
        f"{torch.__version__}; commit {commit()}.",
        "",
        f"raytl: `UnitTrainer.run_epoch` (fine_tune, every block trainable, augment on, random "
        f"weights) on {data} held as uint8 in memory: per step the batch's rows are gathered, "
        "copied to the device (pinned and non-blocking on a GPU), cropped and flipped per image "
        "on the device (crops drawn with NumPy), normalised, 2 batches ahead in a thread (on a "
        "GPU, on a side stream)"
        + (f", {rows[0]['amp']} autocast and channels_last. " if gpu else ", channels_last. ")
        + "Ceiling: the same model and optimizer stepping on one synthetic batch already on the "
        f"device. {setting.steps} timed steps after {setting.warmup} untimed ones, median of "
        f"{setting.repeats} alternating runs after a warm-up epoch. Feed alone: the same loads "
        "and augmentation with no model (what the feed could deliver).",
        "",
        *table(rows, setting),
        "",
        "The frozen-feature cache, as each of its actors computes it (`pooled_features` on the "
        f"same images held as uint8, {setting.steps * setting.batch} rows in "
        f"{setting.batch}-row batches, the next batch copied ahead"
        + (", bf16 autocast, channels_last" if gpu else "")
        + ", eval mode, no gradients), against the same forward on one synthetic batch already "
        "on the device:",
        "",
        *feature_table(features, setting),
        "",
    ]
    if not gpu:
        lines += [
            "**No GPU figure exists yet**: no GPU was lent to the session that wrote this section, "
            "so these are CPU figures at a small size (the ratio says how much of the CPU's time "
            "the feed takes, not how a GPU would be fed). Run `python benchmarks/gpu.py` on a GPU "
            "machine to replace this section with the 224 px figures (goal: raytl / ceiling >= "
            "0.85).",
            "",
        ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace (or append) this script's ``## `` section of docs/benchmarks.md, keeping the rest.

    As ``benchmarks/strategies.py``'s, which cannot be imported here: it pulls in pandas (through
    ``raytl.train``), which a GPU machine may lack."""
    doc = DOC.read_text()
    start = doc.find(HEADING)
    if start >= 0:
        end = doc.find("\n## ", start + len(HEADING))
        doc = doc[:start] + text + (doc[end + 1 :] if end >= 0 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized (the default on a CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    setting = SMALL if args.small or device.type != "cuda" else GPU
    data = real_images(setting.stored, setting.image_size)
    rows, features = [], []
    for backbone in setting.backbones:
        torch.manual_seed(0)
        rows.append(measure(backbone, data, setting, args.compile))
        print(f"{backbone}: {rows[-1]}", flush=True)
        features.append(measure_features(backbone, data, setting))
        print(f"{backbone} features: {features[-1]}", flush=True)
    print("\n".join(table(rows, setting)))
    print("\n".join(feature_table(features, setting)))
    if not args.no_write:
        write_section(section(rows, features, setting, device, data.source))
        print(f"wrote the '{HEADING}' section of {DOC}")


if __name__ == "__main__":
    main()
