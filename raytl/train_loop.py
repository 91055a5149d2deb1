"""A trial's training, where it runs: ONE loop (:func:`train_units`) that trains the units.

:mod:`raytl.trial` builds the trial's context and starts this in one of two places, told apart
only by how a report leaves (the :class:`TrialSession`):

- in the workers of a Ray Train ``TorchTrainer`` (:class:`RayTrainSession`,
  :func:`train_loop_per_worker`): each rank trains the units :func:`~raytl.schemes.assign_units`
  gives it (ranks that share a unit train it as one ``DistributedDataParallel`` model,
  :mod:`raytl.unit_group`); every epoch the ranks gather their units' metrics and report mean and
  std with a checkpoint holding every unit (each unit's owner writes its own file; Ray Train
  merges them), and ``TuneReportCallback`` forwards rank 0's report to Tune;
- in the Tune trial's own process (:class:`TuneSession`, :func:`run_lean_trial`) for a linear
  probe on cached features, which needs no worker group (whose start-up costs far more than
  training a head).

This module imports the unit trainer (timm, torchvision's ops); :mod:`raytl.trial` does not, so
the Tune trial's process of a trial that runs a worker group never imports them.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray import tune

from raytl import warm_workers
from raytl.attempts import (
    Attempt,
    AttemptClock,
    WorkerShare,
    combine,
    history_entry,
    load_checkpoint_meta,
    save_checkpoint_meta,
)
from raytl.data.dataset import ImageData
from raytl.feature_rows import resolve_features
from raytl.schemes import Assignment, Unit, assign_units
from raytl.startup_trace import process_started, trace_startup
from raytl.trial import UNIT_STATE, TrialContext, scheme_units
from raytl.unit import UnitTrainer
from raytl.unit_group import UnitGroup, groups_for_rank


class TrialSession(Protocol):
    """Where :func:`train_units` runs: its rank among the trial's processes, and how a report
    (with its checkpoint folder) leaves. Contract: :meth:`gather` and :meth:`report` are called by
    every rank, the same number of times."""

    rank: int
    world: int
    workers: int  # Ray Train workers, reported per trial (0: the Tune trial trains itself)
    device: torch.device
    saves_heads_only: bool  # checkpoints hold only the heads (the backbone is the pretrained one)

    def checkpoint(self) -> Any: ...
    def unit_groups(self, plan: list[list[Assignment]]) -> dict[int, UnitGroup]: ...
    def gather(self, share: WorkerShare) -> list[WorkerShare]: ...
    def report(self, metrics: dict[str, Any], folder: str | None, epoch: int) -> None: ...


class RayTrainSession:
    """A Ray Train worker: reports go through ``ray.train.report`` (rank 0's reach Tune)."""

    saves_heads_only = False

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.workers = self.world
        self.device = ray.train.torch.get_device()

    def checkpoint(self) -> Any:
        return ray.train.get_checkpoint()

    def unit_groups(self, plan: list[list[Assignment]]) -> dict[int, UnitGroup]:
        """The groups of the units this rank trains with others (data-parallel units only)."""
        return groups_for_rank(plan, self.rank)

    def gather(self, share: WorkerShare) -> list[WorkerShare]:
        shares: list[Any] = [None] * self.world
        dist.all_gather_object(shares, share)
        return shares

    def report(self, metrics: dict[str, Any], folder: str | None, epoch: int) -> None:
        if folder is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
        )


class TuneSession:
    """The Tune trial's own process, one rank holding every unit: reports go to ``tune.report``."""

    rank, world, workers = 0, 1, 0
    device = torch.device("cpu")  # a linear head on cached features: the CPU is plenty
    saves_heads_only = True

    def checkpoint(self) -> Any:
        return tune.get_checkpoint()

    def unit_groups(self, plan: list[list[Assignment]]) -> dict[int, UnitGroup]:
        return {}

    def gather(self, share: WorkerShare) -> list[WorkerShare]:
        return [share]

    def report(self, metrics: dict[str, Any], folder: str | None, epoch: int) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)


def resume_attempt(
    checkpoint: Any,
    trainers: dict[int, UnitTrainer],
    device: torch.device,
    *,
    entered: float,
    startup_seconds: float,
) -> Attempt:
    """Restore every unit from ``checkpoint`` (if any); where this attempt starts."""
    ready = time.time()
    if not checkpoint:
        return Attempt(AttemptClock(startup_seconds=startup_seconds, ready_at=ready), math.nan)
    with checkpoint.as_directory() as folder:
        for unit, trainer in trainers.items():
            trainer.load_state_dict(
                torch.load(
                    Path(folder) / UNIT_STATE.format(unit), map_location=device, weights_only=True
                )
            )
        clock, history, last = load_checkpoint_meta(Path(folder))
    return Attempt(*clock.resumed(entered, time.time()), history, last)


def unit_trainers(
    ctx: TrialContext, session: TrialSession
) -> tuple[dict[int, UnitTrainer], set[int], list[str]]:
    """This rank's trainers by unit, the units whose state it saves, and every unit's name."""
    data: ImageData = ray.get(ctx.data)
    units: list[Unit] = scheme_units(ctx.config, data) if ctx.units is None else ray.get(ctx.units)
    plan = assign_units(len(units), session.world)
    groups = session.unit_groups(plan)
    features = resolve_features(ctx.features)
    trace_startup("data_fetched", ctx.started)
    trainers = {
        a.unit: UnitTrainer.for_space(
            ctx.config,
            ctx.hp,
            data,
            units[a.unit].train,
            units[a.unit].val,
            unit=a.unit,
            device=session.device,
            group=groups.get(a.unit),
            features=features,
        )
        for a in plan[session.rank]
    }
    owners = {a.unit for a in plan[session.rank] if a.rank_in_unit == 0}
    trace_startup("trainers_built", ctx.started)
    return trainers, owners, [u.name for u in units]


def train_units(ctx: TrialContext, session: TrialSession) -> None:
    """The trial's loop: train this rank's units epoch by epoch, report and checkpoint each epoch,
    resuming from the latest checkpoint when this is a restarted attempt."""
    started, entered = time.perf_counter(), time.time()
    torch.set_num_threads(max(1, int(ctx.config.resources.cpus_per_worker)))
    trainers, owners, names = unit_trainers(ctx, session)
    attempt = resume_attempt(
        session.checkpoint(),
        trainers,
        session.device,
        entered=entered,
        startup_seconds=entered - ctx.started,
    )
    trace_startup("ready", ctx.started)
    first = next(iter(trainers.values()))
    if first.epoch >= first.total_epochs and attempt.last_report is not None:
        session.report(attempt.report_again(), None, first.epoch)  # see Attempt.report_again
        return
    history, resumed = list(attempt.history), attempt.resumed_history()
    node = ray.get_runtime_context().get_node_id()
    while first.epoch < first.total_epochs:
        metrics = [
            {**trainer.run_epoch(), "unit": u, "unit_name": names[u], "node_id": node}
            for u, trainer in trainers.items()
        ]
        share = WorkerShare(
            [m for m in metrics if m["unit"] in owners],
            time.perf_counter() - started,
            attempt.clock,
            attempt.restart_startup_seconds,
        )
        report, clock = combine(
            session.gather(share),
            units=len(names),
            workers=session.workers,
            total_epochs=first.total_epochs,
        )
        history.append(history_entry(report))
        with tempfile.TemporaryDirectory(dir=checkpoint_staging()) as folder:
            for unit in owners:
                torch.save(
                    trainers[unit].state_dict(head_only=session.saves_heads_only),
                    Path(folder) / UNIT_STATE.format(unit),
                )
            if session.rank == 0:
                save_checkpoint_meta(Path(folder), clock, history, report)
            has_files = bool(owners) or session.rank == 0
            session.report({**report, **resumed}, folder if has_files else None, report["epoch"])
        resumed = {}


def checkpoint_staging() -> str | None:
    """Where a report's checkpoint is written before Ray copies it to storage: the local Ray's
    own folder (``RAY_TMPDIR``, removed with it), so a worker killed mid-report (a fault, a
    stopped trial) leaves no checkpoint behind in the system's temp folder; elsewhere (a
    cluster's worker, no such folder) the system's."""
    folder = os.environ.get("RAY_TMPDIR")
    return folder if folder and os.path.isdir(folder) else None


def train_loop_per_worker(ctx: TrialContext) -> None:
    """A Ray Train worker's training (entered through :func:`raytl.trial.enter_workers`)."""
    trace_startup(  # preloaded: when this process's imports were done (prestarted: before)
        "worker_entered",
        ctx.started,
        process=process_started(),
        preloaded=warm_workers.preloaded_at,
        runtime_env=warm_workers.own_runtime_env(),  # prestarted ones had the same: the test
    )
    warm_workers.prestart_successor(ctx.config)
    train_units(ctx, RayTrainSession())
    warm_workers.prestart_next_controller(ctx.config)  # not earlier: it would slow the training


def run_lean_trial(ctx: TrialContext) -> None:
    """A head-only trial on cached features, trained in the Tune trial's own process."""
    train_units(ctx, TuneSession())
