"""The fold ensemble: under cv, the best trial's k fold models kept as one final model.

At the end of a cv search the k models of the best trial already exist (its last checkpoint holds
every unit), each trained on (k-1)/k of the pool and scored on the rest. ``search.final:
fold_ensemble`` keeps them instead of refitting one model on the whole pool: the prediction is
their averaged softmax (:class:`SoftmaxEnsemble`), the test split is scored once, and ``best/``
holds all k, in one safetensors file that ``raytl predict``, ``evaluate`` and ``export`` read
like any saved model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
import torch.nn.functional as F
from torch import nn

from raytl.config import SpaceConfig
from raytl.console import wait_for
from raytl.data.dataset import ImageData
from raytl.data.stream import rows_of
from raytl.errors import RaytlError
from raytl.models import SoftmaxEnsemble, classifier_of, create_model
from raytl.preprocess import BatchPreparer, Preprocessing, default_device, preprocessing_for
from raytl.refit import write_best
from raytl.results import sampled_values
from raytl.space import Hyperparameters
from raytl.storage import is_uri
from raytl.strategies import STRATEGIES
from raytl.trial import UNIT_STATE, SearchInputs

TEST_BATCH = 256


def checkpoint_location(path: str, storage: str) -> str:
    """A trial's checkpoint path as Ray reports it (a URI's path has no scheme) made whole."""
    if is_uri(path) or not is_uri(storage):
        return path
    return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}"


def fold_models(
    config: SpaceConfig, hp: Hyperparameters, classes: int, location: str, units: int
) -> list[nn.Module]:
    """The ``units`` models of a trial's checkpoint at ``location`` (a folder or a URI). A trial
    on cached features saved heads only: the backbone is the pretrained one it started from."""
    pretrained = config.model.pretrained if STRATEGIES[hp.strategy].pretrained else "none"
    models = []
    with ray.train.Checkpoint(location).as_directory() as folder:
        for unit in range(units):
            path = Path(folder) / UNIT_STATE.format(unit)
            if not path.is_file():
                raise RaytlError(f"{location}: no {path.name}; expected the trial's {units} units")
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = create_model(hp.backbone_name, classes, pretrained)
            if "head" in state:
                classifier_of(model).load_state_dict(state["head"])
            else:
                model.load_state_dict(state["model"])
            models.append(model.eval())
    return models


@dataclasses.dataclass(frozen=True)
class EnsembleResult:
    """What the fold ensemble measured on the test split, and its weights."""

    test_accuracy: float
    test_loss: float
    test_images: int
    members: int
    seconds: float
    device: str
    test_predictions: list[int]
    test_labels: list[int]
    preprocessing: Preprocessing
    state: dict[str, torch.Tensor]

    def figures(self) -> dict[str, Any]:
        skip = ("state", "preprocessing")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }


@torch.no_grad()
def fold_ensemble(
    config: SpaceConfig, hp: Hyperparameters, data: ImageData, location: str, units: int
) -> EnsembleResult:
    """Load the trial's fold models, average their softmax on the untouched test split."""
    started = time.perf_counter()
    ensemble = SoftmaxEnsemble(fold_models(config, hp, len(data.class_names), location, units))
    device = default_device()
    ensemble.to(device).eval()
    pre = preprocessing_for(ensemble.members[0], config.data.image_size)
    prepare = BatchPreparer(pre, device)
    _, test = config.data.split_test(data)
    chunks = []
    for start in range(0, len(test), TEST_BATCH):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks.append(ensemble(prepare(rows_of(data.images, test[start : start + TEST_BATCH]))))
    log_probs = torch.cat(chunks).float().cpu()
    labels = torch.from_numpy(np.asarray(data.labels[test]))
    predictions = log_probs.argmax(1)
    return EnsembleResult(
        test_accuracy=float((predictions == labels).float().mean()),
        test_loss=float(F.nll_loss(log_probs, labels)),
        test_images=len(test),
        members=units,
        seconds=time.perf_counter() - started,
        device=str(device),
        test_predictions=predictions.tolist(),
        test_labels=labels.tolist(),
        preprocessing=pre,
        state={k: v.detach().cpu() for k, v in ensemble.state_dict().items()},
    )


def remote_fold_ensemble(config: SpaceConfig) -> Any:
    """:func:`fold_ensemble` as a Ray task sized like one of the search's workers."""
    r = config.resources
    return ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(fold_ensemble)


def ensemble_best(
    inputs: SearchInputs,
    data: ImageData,
    best: pd.Series,
    output: Path,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Keep the best trial's fold models as ``best/`` (the ``search.final: fold_ensemble``
    counterpart of :func:`raytl.refit.refit_best`): tested once on the untouched test split."""
    config = inputs.config
    hp = config.hyperparameters(sampled_values(best))
    path = best.get("checkpoint")
    if not isinstance(path, str) or not path:
        raise RaytlError(f"trial {best['trial_id']}: no checkpoint to take its fold models from")
    units = int(best["units"])
    echo(f"keeping the best trial {best['trial_id']}'s {units} fold models as one ensemble")
    result: EnsembleResult = wait_for(
        remote_fold_ensemble(config).remote(
            config, hp, inputs.data, checkpoint_location(path, inputs.storage), units
        ),
        "fold ensemble on the test split",
    )
    model = SoftmaxEnsemble(
        [create_model(hp.backbone_name, len(data.class_names), "none") for _ in range(units)]
    )
    model.load_state_dict(result.state)
    extra = {"final": "fold_ensemble", "ensemble": units}
    summary = write_best(output, config, data, best, hp, model, result, extra)
    echo(
        f"best configuration as a {units}-fold ensemble: test accuracy {result.test_accuracy:.4f} "
        f"on {result.test_images} untouched images; saved to {output / 'best'}"
    )
    return summary
