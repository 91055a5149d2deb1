"""One trial: a thin Tune driver that runs a Ray Train ``TorchTrainer`` whose workers train the units.

Tune samples a configuration and calls :func:`run_trial`; it builds a ``TorchTrainer`` (Train V2)
whose ``TuneReportCallback`` forwards rank 0's per-epoch report to Tune, where ASHA decides whether
the trial goes on. Each worker runs :func:`train_loop_per_worker`: it builds the scheme's units,
trains the ones :func:`~raytl.schemes.assign_units` gives it, gathers every unit's validation
metrics each epoch, and reports their mean and std with a checkpoint holding every unit's state
(each unit's owner writes its own file; Ray Train merges them into one checkpoint directory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from raytl.config import parse_space
from raytl.data.splits import carve_test
from raytl.schemes import Assignment, assign_units, make_units
from raytl.worker import UnitTrainer

UNIT_STATE = "unit_{}.pt"
REPORTS = "reports.json"  # the trial's epoch reports up to a checkpoint (its last one in full)
# a resumed attempt's first report carries, as JSON, the epochs before its checkpoint: Tune rewrites
# a restored trial's progress files from what its saved state knew, which lags behind checkpoints
RESUMED_HISTORY = "resumed_history"
# the per-epoch values kept for learning curves (history.parquet)
HISTORY_COLUMNS = ("epoch", "phase", "val_accuracy", "val_accuracy_std", "val_loss", "val_loss_std",
                   "train_loss", "train_accuracy", "epoch_seconds", "images_per_second",
                   "worker_seconds", "timestamp")


class GroupSync:
    """Gradient averaging among the ranks that share one unit (a torch.distributed subgroup)."""

    def __init__(self, group: Any, ranks: list[int]) -> None:
        self.group = group
        self.ranks = ranks
        self.rank = ranks.index(dist.get_rank())
        self.world_size = len(ranks)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)  # one all-reduce, not one per tensor
        dist.all_reduce(flat, group=self.group)
        flat /= self.world_size
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, group=self.group)
        return values

    def broadcast_model(self, model: torch.nn.Module) -> None:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, self.ranks[0], group=self.group)


def _syncs(plan: list[list[Assignment]], rank: int) -> dict[int, GroupSync]:
    """Subgroups for data-parallel units; every rank creates every group, in the same order."""
    syncs: dict[int, GroupSync] = {}
    per = plan[0][0].ranks_per_unit
    if per == 1:
        return syncs
    for unit in range(len(plan) // per):
        ranks = list(range(unit * per, (unit + 1) * per))
        group = dist.new_group(ranks)
        if rank in ranks:
            syncs[unit] = GroupSync(group, ranks)
    return syncs


def trial_status(last: dict[str, Any], failed: bool = False) -> str:
    """What a finished trial's last report says: completed, stopped (by ASHA) or error."""
    if failed:
        return "error"
    total = int(last.get("total_epochs") or 0)
    return "completed" if total and int(last.get("epoch") or 0) >= total else "stopped"


def summarize(unit_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over units of each unit's epoch metrics (what Tune and ASHA see)."""
    out: dict[str, Any] = {}
    for key in ("val_accuracy", "val_loss", "train_loss", "train_accuracy"):
        values = [m[key] for m in unit_metrics]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return out


def _setup(cfg: dict[str, Any]) -> tuple[Any, Any, Any, list[Any]]:
    """The space, the data (from the object store), the trial's hyperparameters and its units."""
    import ray

    # the driver validated the space, paths and weights included: here it is only read back
    config = parse_space(cfg["space"], cfg["source"], local_paths=False)
    data = ray.get(cfg["data_ref"][0])
    hp = config.hyperparameters(cfg["sampled"])
    return config, data, hp, scheme_units(config, data)


def scheme_units(config: Any, data: Any) -> list[Any]:
    """The scheme's units on the training pool (the test split carved off first). Raises a
    DataError naming the class when one is too small for the folds or segments."""
    seed = config.data.seed
    pool, _test = carve_test(data.labels, config.data.test_fraction, seed, data.class_names)
    return make_units(config.scheme, data.labels, pool, val_fraction=config.data.val_fraction,
                      seed=seed, class_names=data.class_names)


def _shared_features(cfg: dict[str, Any], backbone: str) -> Any:
    """The cached frozen features for this backbone (zero-copy from the object store), if any."""
    import ray

    ref = (cfg.get("feature_refs") or {}).get(backbone)
    return ray.get(ref) if ref is not None else None


def _unit_trainer(config: Any, data: Any, hp: Any, unit: Any, index: int, device: Any,
                  sync: Any = None, features: Any = None) -> UnitTrainer:
    return UnitTrainer(hp, data, unit.train, unit.val, pretrained=config.model.pretrained,
                       image_size=config.data.image_size, device=device,
                       seed=config.search.seed + index, sync=sync, features=features,
                       compile=config.model.compile)


TRIAL_CLOCK = "trial_clock.json"


@dataclasses.dataclass
class AttemptClock:
    """A trial's costs across restarts, carried in every checkpoint (``trial_clock.json``).

    The first attempt's start-up and first step (``ready_at``) stay the trial's; a restarted
    attempt (a worker or node died, Train resumed from the checkpoint) adds to ``restarts`` and
    reports its own set-up (data, model, checkpoint load) as ``restart_startup_seconds``.
    """

    worker_seconds: float = 0.0  # spent by every attempt before this checkpoint
    startup_seconds: float = math.nan
    ready_at: float = math.nan
    restarts: int = 0

    def resumed(self, entered: float, ready: float) -> tuple[AttemptClock, float]:
        """This clock for an attempt that entered at ``entered`` and was ready at ``ready``."""
        return dataclasses.replace(self, restarts=self.restarts + 1), ready - entered

    def save(self, folder: Path) -> None:
        (Path(folder) / TRIAL_CLOCK).write_text(json.dumps(dataclasses.asdict(self)))


class Attempt(NamedTuple):
    """Where one attempt of a trial starts: its clock, its own set-up seconds when it is a restart
    (NaN for the first), and the reports saved with the checkpoint it resumed from."""

    clock: AttemptClock
    restart_startup_seconds: float
    history: list[dict[str, Any]] = []  # one history_entry per epoch up to the checkpoint
    last_report: dict[str, Any] | None = None  # the checkpoint's own epoch report, in full

    def resumed_history(self) -> dict[str, str]:
        """What this attempt's first report adds so the epochs before the restart are not lost."""
        return {RESUMED_HISTORY: json.dumps(self.history)} if self.history else {}

    def report_again(self) -> dict[str, Any]:
        """The resumed checkpoint's report, for a trial that had already trained every epoch: the
        driver died after the final checkpoint but before Tune saw the trial end, and Tune needs
        the final metrics once more to close it."""
        return {**(self.last_report or {}), "restarts": self.clock.restarts,
                "restart_startup_seconds": self.restart_startup_seconds, **self.resumed_history()}


def history_entry(report: dict[str, Any]) -> dict[str, Any]:
    """The part of an epoch report that history.parquet keeps."""
    return {**{k: report[k] for k in HISTORY_COLUMNS if k in report}, "timestamp": time.time()}


def save_checkpoint_meta(folder: Path, clock: AttemptClock, history: list[dict[str, Any]],
                         report: dict[str, Any]) -> None:
    """What a checkpoint carries besides the units' states (written by one rank)."""
    clock.save(folder)
    (Path(folder) / REPORTS).write_text(json.dumps({"history": history, "last": report}))


def load_checkpoint_meta(folder: Path) -> tuple[AttemptClock, list[dict[str, Any]], dict[str, Any] | None]:
    """What :func:`save_checkpoint_meta` wrote: the clock, the epoch history, the last report."""
    clock, reports = Path(folder) / TRIAL_CLOCK, Path(folder) / REPORTS
    saved = json.loads(reports.read_text()) if reports.is_file() else {"history": [], "last": None}
    return (AttemptClock(**json.loads(clock.read_text())) if clock.is_file() else AttemptClock(),
            saved["history"], saved["last"])


def _load_units(folder: str, trainers: dict[int, UnitTrainer], device: Any) -> None:
    """Restore every unit from a checkpoint folder."""
    for unit, trainer in trainers.items():
        trainer.load_state_dict(torch.load(Path(folder) / UNIT_STATE.format(unit),
                                           map_location=device, weights_only=True))


def _attempt(checkpoint: Any, trainers: dict[int, UnitTrainer], device: Any, *, entered: float,
             startup_seconds: float) -> Attempt:
    """Resume the units from ``checkpoint`` (if any)."""
    ready = time.time()
    if not checkpoint:
        return Attempt(AttemptClock(startup_seconds=startup_seconds, ready_at=ready), math.nan)
    with checkpoint.as_directory() as folder:
        _load_units(folder, trainers, device)
        clock, history, last = load_checkpoint_meta(Path(folder))
    return Attempt(*clock.resumed(entered, time.time()), history, last)


def epoch_report(unit_metrics: list[dict[str, Any]], *, units: int, workers: int, total_epochs: int,
                 clock: AttemptClock, restart_startup_seconds: float) -> dict[str, Any]:
    """What one epoch reports to Tune: mean/std over units, costs, and every unit's own values."""
    report = {
        **summarize(unit_metrics),
        "epoch": unit_metrics[0]["epoch"],
        "total_epochs": total_epochs,
        "phase": unit_metrics[0]["phase"],
        "units": units,
        "workers": workers,
        "worker_seconds": clock.worker_seconds,
        "startup_seconds": clock.startup_seconds,
        "ready_at": clock.ready_at,  # wall clock when the last worker was ready for its first step
        "restarts": clock.restarts,  # attempts resumed from a checkpoint (worker/node/driver died)
        "restart_startup_seconds": restart_startup_seconds,  # the latest restart's own set-up
        "epoch_seconds": max(m["epoch_seconds"] for m in unit_metrics),
        "images_per_second": sum(m["images_per_second"] for m in unit_metrics),
        "head_only": all(m.get("head_only") for m in unit_metrics),
        "nodes": ",".join(sorted({m["node_id"] for m in unit_metrics})),
    }
    for m in unit_metrics:
        for key in ("val_accuracy", "val_loss", "train_loss", "images_per_second"):
            report[f"unit/{m['unit_name']}/{key}"] = m[key]
        report[f"unit/{m['unit_name']}/node_id"] = m["node_id"]
        for key, value in m.items():
            if key.startswith("lr/"):
                report[f"unit/{m['unit_name']}/{key}"] = value
    return report


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker: train this rank's units, report every epoch."""
    import ray
    import ray.train
    import ray.train.torch

    started, entered = time.perf_counter(), time.time()
    startup_seconds = entered - cfg["trial_started"]  # Tune trial start -> this worker running
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    config, data, hp, units = _setup(cfg)
    plan = assign_units(len(units), world)
    syncs = _syncs(plan, rank)
    device = ray.train.torch.get_device()
    features = _shared_features(cfg, hp.backbone)
    trainers = {a.unit: _unit_trainer(config, data, hp, units[a.unit], a.unit, device,
                                      syncs.get(a.unit), features)
                for a in plan[rank]}
    owners = {a.unit for a in plan[rank] if a.rank_in_unit == 0}
    attempt = _attempt(ray.train.get_checkpoint(), trainers, device, entered=entered,
                       startup_seconds=startup_seconds)
    clock, restart_startup = attempt.clock, attempt.restart_startup_seconds
    total_epochs = next(iter(trainers.values())).total_epochs
    node = ray.get_runtime_context().get_node_id()
    if next(iter(trainers.values())).epoch >= total_epochs and attempt.last_report is not None:
        ray.train.report(attempt.report_again())  # every rank: report is collective
        return
    history, resumed_history = list(attempt.history), attempt.resumed_history()
    while next(iter(trainers.values())).epoch < total_epochs:
        mine = []
        for unit, trainer in trainers.items():
            metrics = trainer.run_epoch()
            if unit in owners:
                mine.append({**metrics, "unit": unit, "unit_name": units[unit].name, "node_id": node})
        elapsed = time.perf_counter() - started
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (mine, elapsed, clock, restart_startup))
        unit_metrics = sorted((m for ms, *_ in gathered for m in ms), key=lambda m: m["unit"])
        # every rank resumed from the same checkpoint, so they hold the same earlier clock
        trial_clock = dataclasses.replace(
            clock, worker_seconds=clock.worker_seconds + sum(g[1] for g in gathered),
            startup_seconds=max(g[2].startup_seconds for g in gathered),
            ready_at=max(g[2].ready_at for g in gathered))
        report = epoch_report(unit_metrics, units=len(units), workers=world, total_epochs=total_epochs,
                              clock=trial_clock, restart_startup_seconds=max(g[3] for g in gathered))
        epoch = report["epoch"]
        history.append(history_entry(report))
        with tempfile.TemporaryDirectory() as folder:
            for unit in owners:
                torch.save(trainers[unit].state_dict(), Path(folder) / UNIT_STATE.format(unit))
            if rank == 0:
                save_checkpoint_meta(Path(folder), trial_clock, history, report)
            has_files = bool(owners) or rank == 0
            ray.train.report(
                {**report, **resumed_history},
                checkpoint=ray.train.Checkpoint.from_directory(folder) if has_files else None,
                checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
            )
        resumed_history = {}


def is_lean(sampled: dict[str, Any], space: dict[str, Any], cached_backbones: Any) -> bool:
    """Whether a trial only ever trains a head on cached features, so it needs no Ray Train
    worker group (whose start-up costs far more than the training itself)."""
    if not cached_backbones:
        return False
    hp = parse_space(space, local_paths=False).hyperparameters(sampled)
    return hp.strategy == "linear_probe" and not hp.augment and hp.backbone in cached_backbones


def run_lean_trial(cfg: dict[str, Any]) -> None:
    """A head-only trial on cached features, inside the Tune trial's own process: every unit
    in turn, the same report and per-unit checkpoint files as a Ray Train trial."""
    import ray
    from ray import tune

    started, entered = time.perf_counter(), time.time()
    torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    config, data, hp, units = _setup(cfg)
    device = torch.device("cpu")  # a linear head on cached features: the CPU is plenty
    features = _shared_features(cfg, hp.backbone)
    trainers = {i: _unit_trainer(config, data, hp, unit, i, device, None, features)
                for i, unit in enumerate(units)}
    attempt = _attempt(tune.get_checkpoint(), trainers, device, entered=entered,
                       startup_seconds=time.time() - cfg["trial_started"])
    clock, restart_startup = attempt.clock, attempt.restart_startup_seconds
    total_epochs = trainers[0].total_epochs
    node = ray.get_runtime_context().get_node_id()
    if trainers[0].epoch >= total_epochs and attempt.last_report is not None:
        tune.report(attempt.report_again())
        return
    history, resumed_history = list(attempt.history), attempt.resumed_history()
    while trainers[0].epoch < total_epochs:
        unit_metrics = [{**trainer.run_epoch(), "unit": i, "unit_name": units[i].name, "node_id": node}
                        for i, trainer in trainers.items()]
        trial_clock = dataclasses.replace(
            clock, worker_seconds=clock.worker_seconds + time.perf_counter() - started)
        report = epoch_report(unit_metrics, units=len(units), workers=0, total_epochs=total_epochs,
                              clock=trial_clock, restart_startup_seconds=restart_startup)
        history.append(history_entry(report))
        with tempfile.TemporaryDirectory() as folder:
            for i, trainer in trainers.items():
                torch.save(trainer.state_dict(head_only=True), Path(folder) / UNIT_STATE.format(i))
            save_checkpoint_meta(Path(folder), trial_clock, history, report)
            tune.report({**report, **resumed_history},
                        checkpoint=tune.Checkpoint.from_directory(folder))
        resumed_history = {}


def run_trial(sampled: dict[str, Any], *, space: dict[str, Any], source: str, data_ref: list[Any],
              storage_path: str, max_failures: int,
              feature_refs: dict[str, Any] | None = None) -> None:
    """The Tune trial: a thin driver around one TorchTrainer (Train V2 + TuneReportCallback), or,
    for a head-only trial on cached features, the training itself (:func:`run_lean_trial`)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = space["resources"]
    loop_config = {
        "space": space, "source": source, "sampled": dict(sampled), "data_ref": data_ref,
        "feature_refs": feature_refs or {}, "cpus_per_worker": resources["cpus_per_worker"],
        "trial_started": time.time(),
    }
    if is_lean(sampled, space, feature_refs or {}):
        run_lean_trial(loop_config)
        return
    gpus = float(resources["gpus_per_worker"])
    per_worker = {"CPU": float(resources["cpus_per_worker"])}
    if gpus:
        per_worker["GPU"] = gpus
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(resources["workers_per_trial"]), use_gpu=gpus > 0,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=f"train_{trial_id}",
            storage_path=storage_path,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()

