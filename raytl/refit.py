"""Refit a configuration on the whole training pool and test it once on the untouched test split.

The search's best trial is refit into ``best/`` (the model a user keeps); ``raytl compare`` refits
many configurations the same way, for its test figures only. A refit runs as a worker-sized Ray
task that reads the data (and the cached features) from the search's copy in the object store.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch

from raytl.config import SpaceConfig
from raytl.console import wait_for
from raytl.data.dataset import ImageData
from raytl.data.stream import rows_of
from raytl.models import create_model, save_model, to_json
from raytl.preprocess import Preprocessing
from raytl.results import sampled_values
from raytl.space import Hyperparameters
from raytl.storage import atomic_folder, atomic_write
from raytl.tensorboard import write_refit_images
from raytl.trial import SearchInputs, scheme_units
from raytl.unit import UnitTrainer


@dataclass(frozen=True)
class RefitResult:
    """What a refit measured (and, when asked for, the trained weights)."""

    test_accuracy: float
    test_loss: float
    test_images: int
    train_images: int
    train_loss: list[float]
    seconds: float
    device: str
    torch_threads: int
    test_predictions: list[int]
    test_labels: list[int]
    preprocessing: Preprocessing
    state: dict[str, torch.Tensor] | None = None
    # raytl.metrics' definitions; top-5 NaN with 5 classes or fewer
    test_balanced_accuracy: float = math.nan
    test_macro_f1: float = math.nan
    test_top5_accuracy: float = math.nan

    def figures(self) -> dict[str, Any]:
        """Everything but the weights and the preprocessing, for ``best/metrics.json`` (top-5
        accuracy only where it is defined: JSON has no NaN)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("state", "preprocessing")
            and not (f.name == "test_top5_accuracy" and math.isnan(self.test_top5_accuracy))
        }


def refit(
    config: SpaceConfig,
    hp: Hyperparameters,
    data: ImageData,
    features: Any = None,
    keep_state: bool = True,
    probe_passes: int | None = None,
) -> RefitResult:
    """Train ``hp`` on the whole pool (train+val), evaluate on the test split.

    ``keep_state=False`` returns the figures only (``raytl compare`` refits many configurations).
    ``probe_passes``: a converged probe phase's passes, as the searched trial's units kept them
    (the pool has no validation split to stop on, :mod:`raytl.probe`).
    """
    started = time.perf_counter()
    pool, test = config.data.split_test(data)
    no_val = np.array([], dtype=np.int64)
    trainer = UnitTrainer.for_space(
        config, hp, data, pool, no_val, features=features, probe_passes=probe_passes
    )
    history = [trainer.run_epoch() for _ in range(trainer.total_epochs)]
    result = trainer.evaluate(test)
    state = (
        {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()} if keep_state else None
    )
    return RefitResult(
        test_accuracy=result.accuracy,
        test_loss=result.loss,
        test_images=len(test),
        train_images=len(pool),
        train_loss=[h["train_loss"] for h in history],
        seconds=time.perf_counter() - started,
        device=str(trainer.device),
        torch_threads=torch.get_num_threads(),
        test_predictions=result.predictions.tolist(),
        test_labels=data.labels[test].tolist(),
        preprocessing=trainer.pre,
        state=state,
        test_balanced_accuracy=result.balanced_accuracy,
        test_macro_f1=result.macro_f1,
        test_top5_accuracy=result.top5_accuracy,
    )


def searched_passes(row: pd.Series) -> int | None:
    """The passes a trial's converged probe kept (mean over its units, rounded), if it had one."""
    passes = row.get("probe_passes")
    return int(round(passes)) if passes is not None and passes == passes and passes > 0 else None


def remote_refit(config: SpaceConfig) -> Any:
    """:func:`refit` as a Ray task sized like one of the search's workers."""
    r = config.resources
    return ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(refit)


def searched_batch(config: SpaceConfig, hp: Hyperparameters, data: ImageData) -> Hyperparameters:
    """``hp`` with the batch its trials really trained with: a unit on k ranks takes
    ``batch_size`` per rank, k times that per step (unit_group.learning_rate_scale keeps the
    learning rate), so the one-process refit takes k times ``batch_size`` to train alike."""
    units = len(scheme_units(config, data))
    per_unit = max(1, config.resources.workers_per_trial // units)
    return dataclasses.replace(hp, batch_size=hp.batch_size * per_unit) if per_unit > 1 else hp


def write_best(
    output: Path,
    config: SpaceConfig,
    data: ImageData,
    best: pd.Series,
    hp: Hyperparameters,
    model: torch.nn.Module,
    result: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``best/`` (the final model, its config and ``metrics.json``) and its test figures in
    TensorBoard; ``result`` is a :class:`RefitResult` or a fold ensemble's result; ``extra``
    goes into both ``metrics.json`` and the model's config. Returns the summary."""
    summary = {
        "trial_id": best["trial_id"],
        **(extra or {}),
        "hyperparameters": dataclasses.asdict(hp),
        "search_metric": config.search.metric,
        "search_value": float(best[f"{config.search.metric}_mean"]),
        **result.figures(),
    }
    with atomic_folder(output / "best") as staging:  # a full disk leaves no half a best/
        save_model(
            staging,
            model,
            backbone=hp.backbone_name,
            class_names=list(data.class_names),
            preprocessing=result.preprocessing,
            extra={"hyperparameters": dataclasses.asdict(hp), **(extra or {})},
        )
        atomic_write(staging / "metrics.json", to_json(summary))
    _, test = config.data.split_test(data)
    write_refit_images(
        output / "tensorboard",
        list(data.class_names),
        result.test_labels,
        result.test_predictions,
        rows_of(data.images, test),  # a few are shown: a stream decodes only those
    )
    return summary


def refit_best(
    inputs: SearchInputs,
    data: ImageData,
    best: pd.Series,
    output: Path,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Retrain the best configuration on train+val (one unit), test once, write ``best/``."""
    config = inputs.config
    hp = searched_batch(config, config.hyperparameters(sampled_values(best)), data)
    echo(
        f"refitting the best trial {best['trial_id']} on train+val: "
        + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in dataclasses.asdict(hp).items()
        )
    )
    result: RefitResult = wait_for(
        remote_refit(config).remote(
            config,
            hp,
            inputs.data,
            inputs.features.get(hp.backbone_name),
            True,
            searched_passes(best),
        ),
        "refit on train+val",
    )
    model = create_model(hp.backbone_name, len(data.class_names), "none")
    model.load_state_dict(result.state or {})
    summary = write_best(output, config, data, best, hp, model, result)
    echo(
        f"best configuration: test accuracy {result.test_accuracy:.4f} on "
        f"{result.test_images} untouched images (refit {result.seconds:.0f}s); saved to {output / 'best'}"
    )
    return summary
