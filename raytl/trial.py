"""One trial, on Tune's side: its typed :class:`TrialContext`, built once, and how it trains.

Tune samples a configuration and calls :func:`run_trial` with the search's :class:`SearchInputs`.
It builds the trial's context (the validated space, the resolved hyperparameters, object-store
references to the data and the cached features) and starts the trial's training
(:mod:`raytl.train_loop`): in the workers of a Ray Train ``TorchTrainer`` (:func:`make_trainer`),
or, for a linear probe on cached features, in this process.

This process imports :mod:`raytl.train_loop` (the unit trainer: timm, torchvision's ops) only
for the latter, by name (:func:`train_loop`, the package's one import by name): a trial that runs
a worker group is a new Tune process every trial, and they cost it 1.4 s of CPU and 185 MB
(docs/benchmarks.md, "Trial start-up"). The workers import it when they enter the training
function (:func:`enter_workers`), prestarted with it imported (:mod:`raytl.warm_workers`).
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from raytl import warm_workers
from raytl.config import SpaceConfig
from raytl.data.dataset import ImageData
from raytl.schemes import Unit, make_units
from raytl.space import Hyperparameters
from raytl.startup_trace import process_started, trace_startup
from raytl.strategies import STRATEGIES

TRAIN_LOOP = "raytl.train_loop"
"""The module that trains a trial's units, imported by name (:func:`train_loop`)."""

UNIT_STATE = "unit_{}.pt"


@dataclass(frozen=True)
class SearchInputs:
    """What every trial of one search reads; built once by the driver, pickled with the trainable."""

    config: SpaceConfig
    data: Any  # ray.ObjectRef of the ImageData: one copy in the object store
    storage: str  # where Tune's experiment and Train's checkpoints go (path or URI)
    features: dict[str, Any] = field(default_factory=dict)  # backbone -> ObjectRef of its features
    units: Any = None  # ray.ObjectRef of the scheme's units, cut by the driver (None: cut here)


@dataclass(frozen=True)
class TrialContext:
    """One trial's configuration, resolved once in the Tune trial and sent to every worker."""

    config: SpaceConfig
    hp: Hyperparameters
    data: Any  # ray.ObjectRef of the ImageData
    features: Any | None  # ray.ObjectRef of this backbone's cached features, if any
    storage: str
    started: float  # wall clock when Tune started the trial
    units: Any = None  # ray.ObjectRef of the scheme's units (None: each worker cuts them)

    @classmethod
    def create(cls, inputs: SearchInputs, sampled: dict[str, Any]) -> TrialContext:
        hp = inputs.config.hyperparameters(sampled)
        return cls(
            inputs.config,
            hp,
            inputs.data,
            inputs.features.get(hp.backbone_name),
            inputs.storage,
            time.time(),
            inputs.units,
        )

    @property
    def lean(self) -> bool:
        return is_lean(self.hp, [self.hp.backbone_name] if self.features is not None else [])


def is_lean(hp: Hyperparameters, cached_backbones: Collection[str]) -> bool:
    """Whether a trial only ever trains a head on cached features, so it needs no Ray Train
    worker group (whose start-up costs far more than the training itself)."""
    return (
        STRATEGIES[hp.strategy].only_probes
        and not hp.augment
        and hp.backbone_name in cached_backbones
    )


def scheme_units(config: SpaceConfig, data: ImageData) -> list[Unit]:
    """The scheme's units on the training pool (the test split carved off first). Raises a
    DataError naming the class when one is too small for the folds or segments."""
    seed = config.data.seed
    pool, _test = config.data.split_test(data)
    return make_units(
        config.scheme.kind,
        config.scheme.size,
        data.labels,
        pool,
        val_fraction=config.data.val_fraction,
        seed=seed,
        class_names=data.class_names,
        groups=data.groups,
    )


def with_units(inputs: SearchInputs) -> SearchInputs:
    """``inputs`` with its search's units cut once, here, into the object store: every trial's
    workers read them instead of cutting them again, so a worker never imports scikit-learn
    and SciPy (0.85 s of each trial's start-up on 2 cores)."""
    units = scheme_units(inputs.config, ray.get(inputs.data))
    return replace(inputs, units=ray.put(units))


def train_loop() -> ModuleType:
    """:mod:`raytl.train_loop`, imported now if it was not yet: by name, so that importing this
    module (the Tune trial's process) does not import the unit trainer. Its names are checked by
    tests/test_layout.py."""
    return importlib.import_module(TRAIN_LOOP)


def enter_workers(ctx: TrialContext) -> None:
    """The function the TorchTrainer's workers run: :func:`raytl.train_loop.train_loop_per_worker`
    for ``ctx``.

    The trial's context comes bound into it (``functools.partial``, :func:`make_trainer`), not
    as ``train_loop_config``: the function is unpickled by the workers alone, but the config also
    by Ray Train's controller, which then imported raytl (timm, scikit-learn) for nothing, about
    3 s of every trial's start-up (docs/benchmarks.md, "Trial start-up")."""
    train_loop().train_loop_per_worker(ctx)


def run_trial(sampled: dict[str, Any], *, inputs: SearchInputs) -> None:
    """The Tune trial: a thin driver around one TorchTrainer (Train V2 + TuneReportCallback), or,
    for a head-only trial on cached features, the training itself."""
    ctx = TrialContext.create(inputs, sampled)
    trace_startup("trial_entered", ctx.started, process=process_started())
    if ctx.lean:
        train_loop().run_lean_trial(ctx)
        return
    trainer = make_trainer(ctx, tune.get_context().get_trial_id())
    trace_startup("fit_called", ctx.started)
    trainer.fit()


def make_trainer(ctx: TrialContext, trial_id: str) -> TorchTrainer:
    """The trial's TorchTrainer: its workers, checkpoints (on the search's storage, resumed by
    name) and failure budget."""
    r = ctx.config.resources
    per_worker = {"CPU": float(r.cpus_per_worker)}
    if r.gpus_per_worker:
        per_worker["GPU"] = float(r.gpus_per_worker)
    return TorchTrainer(
        functools.partial(enter_workers, ctx),  # not train_loop_config: see there
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers_per_trial,
            use_gpu=r.gpus_per_worker > 0,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=f"train_{trial_id}",
            storage_path=ctx.storage,
            # Train V2 takes Tune's report callback; ray's annotation still names V1's Callback
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            failure_config=ray.train.FailureConfig(max_failures=ctx.config.search.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Train V2's RunConfig (ray.train's annotation still names V1's, without it)
            worker_runtime_env=warm_workers.worker_runtime_env(),  # type: ignore[call-arg]
        ),
    )
