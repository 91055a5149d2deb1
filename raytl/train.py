"""``raytl train``: one configuration, one holdout unit, no Ray: train, test once, save.

The same :class:`~raytl.unit.UnitTrainer` runs inside every Ray Train worker during a search;
this module is its plain single-process driver (and the quickest way to try a configuration).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from raytl.config import SpaceConfig
from raytl.data.dataset import ImageData
from raytl.data.splits import stratified_split
from raytl.models import save_model, to_json
from raytl.rundir import write_skipped, write_space
from raytl.storage import atomic_write
from raytl.unit import UnitTrainer


def _progress_bar(
    enabled: bool, desc: str
) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    bar = tqdm(desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(step: int, total: int) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    return update, bar.close


# what ``raytl train --overwrite`` clears (in a folder raytl made, see raytl.rundir)
TRAIN_OUTPUTS = (
    "model.safetensors",
    "config.json",
    "class_names.json",
    "metrics.json",
    "space.yaml",
    "skipped.txt",
)


def train_single(
    config: SpaceConfig,
    output: Path,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the file's fixed configuration on a holdout split, test once, save to ``output``."""
    started = time.perf_counter()
    data = config.data.load()
    train_idx, val_idx, test_idx = holdout_split(config, data)
    hp = config.hyperparameters()
    echo(
        f"data: {data.source}: {len(data)} images, {len(data.class_names)} classes "
        f"(train {len(train_idx)}, val {len(val_idx)}, test {len(test_idx)}), "
        f"fingerprint {data.fingerprint}"
    )
    write_skipped(output, data)
    trainer = UnitTrainer.for_space(config, hp, data, train_idx, val_idx)
    echo(_describe(trainer, config.model.pretrained))
    history = train_epochs(trainer, progress, echo)
    test = trainer.evaluate(test_idx)
    seconds = time.perf_counter() - started
    echo(
        f"test accuracy {test.accuracy:.4f} (loss {test.loss:.4f}) on {len(test_idx)} untouched "
        f"images; {seconds:.1f}s in all"
    )
    sizes = {
        "images": len(data),
        "train": len(train_idx),
        "val": len(val_idx),
        "test": len(test_idx),
    }
    summary = {
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "val_accuracy": history[-1]["val_accuracy"] if history else None,
        "seconds": seconds,
        "hyperparameters": dataclasses.asdict(hp),
        "data": {"source": data.source, "fingerprint": data.fingerprint, **sizes},
        "history": history,
    }
    save_model(
        output,
        trainer.model,
        backbone=hp.backbone_name,
        class_names=list(data.class_names),
        preprocessing=trainer.pre,
        extra={"hyperparameters": dataclasses.asdict(hp)},
    )
    atomic_write(output / "metrics.json", to_json(summary))
    write_space(output, config)
    return summary


def holdout_split(config: SpaceConfig, data: ImageData) -> tuple[np.ndarray, ...]:
    """(train, val, test): the test split carved first, then the holdout validation split."""
    seed = config.data.seed
    pool, test_idx = config.data.split_test(data)
    train_idx, val_idx = stratified_split(
        data.labels,
        pool,
        config.data.val_fraction,
        seed,
        data.class_names,
        "the validation split",
        groups=data.groups,
    )
    return train_idx, val_idx, test_idx


def _describe(trainer: UnitTrainer, pretrained: str) -> str:
    weights = f"pretrained: {pretrained}" if trainer.strategy.pretrained else "random init"
    phases = ", ".join(f"{p.name} {p.epochs} ep (freeze {p.freeze_depth})" for p in trainer.phases)
    return (
        f"model: {trainer.hp.backbone} ({weights}), {len(trainer.blocks)} blocks; strategy "
        f"{trainer.hp.strategy}: {phases}; device {trainer.device}"
    )


def train_epochs(
    trainer: UnitTrainer, progress: bool, echo: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every epoch of the trainer, one line each (and a progress bar on a terminal)."""
    history = []
    for _ in range(trainer.total_epochs):
        update, close = _progress_bar(progress, f"epoch {trainer.epoch + 1}/{trainer.total_epochs}")
        metrics = trainer.run_epoch(progress=update)
        close()
        history.append(metrics)
        echo(
            f"epoch {metrics['epoch']:>2}/{trainer.total_epochs} [{metrics['phase']}] "
            f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.3f} | "
            f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.3f} | "
            f"{metrics['epoch_seconds']:.1f}s, {metrics['images_per_second']:.0f} img/s"
        )
    return history
