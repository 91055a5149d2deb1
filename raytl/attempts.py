"""A trial's attempts and what its checkpoints carry besides the units' weights.

A trial may run more than once: a worker or node dies and Ray Train restarts it from the latest
checkpoint, or the driver dies and ``raytl resume`` restores it. :class:`AttemptClock` keeps the
trial's costs across those restarts, and every checkpoint carries it together with the epoch
reports so far, so no epoch of the trial's history and none of its seconds are lost.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

from raytl.metrics import VAL_METRICS
from raytl.storage import atomic_write

REPORTS = "reports.json"  # the trial's epoch reports up to a checkpoint (its last one in full)
# a resumed attempt's first report carries, as JSON, the epochs before its checkpoint: Tune rewrites
# a restored trial's progress files from what its saved state knew, which lags behind checkpoints
RESUMED_HISTORY = "resumed_history"
# the per-epoch values kept for learning curves (history.parquet): every validation metric's mean
# and std over units (raytl.metrics.VAL_METRICS)
HISTORY_COLUMNS = (
    "epoch",
    "phase",
    *(column for metric in VAL_METRICS for column in (metric, f"{metric}_std")),
    "train_loss",
    "train_accuracy",
    "epoch_seconds",
    "images_per_second",
    "worker_seconds",
    "timestamp",
)


ATTEMPT_CLOCK = "attempt_clock.json"


@dataclasses.dataclass
class AttemptClock:
    """A trial's costs across restarts, carried in every checkpoint (``attempt_clock.json``).

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
        atomic_write(Path(folder) / ATTEMPT_CLOCK, json.dumps(dataclasses.asdict(self)))


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
        return {
            **(self.last_report or {}),
            "restarts": self.clock.restarts,
            "restart_startup_seconds": self.restart_startup_seconds,
            **self.resumed_history(),
        }


def history_entry(report: dict[str, Any]) -> dict[str, Any]:
    """The part of an epoch report that history.parquet keeps."""
    return {**{k: report[k] for k in HISTORY_COLUMNS if k in report}, "timestamp": time.time()}


def save_checkpoint_meta(
    folder: Path, clock: AttemptClock, history: list[dict[str, Any]], report: dict[str, Any]
) -> None:
    """What a checkpoint carries besides the units' states (written by one rank)."""
    clock.save(folder)
    atomic_write(Path(folder) / REPORTS, json.dumps({"history": history, "last": report}))


def load_checkpoint_meta(
    folder: Path,
) -> tuple[AttemptClock, list[dict[str, Any]], dict[str, Any] | None]:
    """What :func:`save_checkpoint_meta` wrote: the clock, the epoch history, the last report."""
    clock, reports = Path(folder) / ATTEMPT_CLOCK, Path(folder) / REPORTS
    saved = json.loads(reports.read_text()) if reports.is_file() else {"history": [], "last": None}
    return (
        AttemptClock(**json.loads(clock.read_text())) if clock.is_file() else AttemptClock(),
        saved["history"],
        saved["last"],
    )


def summarize(unit_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over units of each unit's epoch metrics (what Tune and ASHA see); a metric
    the units do not record (top-5 accuracy with 5 classes or fewer) is left out."""
    out: dict[str, Any] = {}
    for key in (*VAL_METRICS, "train_loss", "train_accuracy"):
        values = [m[key] for m in unit_metrics if key in m]
        if not values or len(values) < len(unit_metrics):
            continue
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return out


def epoch_report(
    unit_metrics: list[dict[str, Any]],
    *,
    units: int,
    workers: int,
    total_epochs: int,
    clock: AttemptClock,
    restart_startup_seconds: float,
) -> dict[str, Any]:
    """What one epoch reports to Tune: mean/std over units, costs, and every unit's own values."""
    report = {
        **summarize(unit_metrics),
        "epoch": unit_metrics[0]["epoch"],
        "total_epochs": total_epochs,
        "rung_epoch": unit_metrics[0]["rung_epoch"],  # what ASHA counts (raytl.strategies)
        "probe_passes": statistics.fmean(m["probe_passes"] for m in unit_metrics),
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
        for key in (*VAL_METRICS, "train_loss", "images_per_second"):
            if key in m:
                report[f"unit/{m['unit_name']}/{key}"] = m[key]
        report[f"unit/{m['unit_name']}/node_id"] = m["node_id"]
        for key, value in m.items():
            if key.startswith("lr/"):
                report[f"unit/{m['unit_name']}/{key}"] = value
    return report


class WorkerShare(NamedTuple):
    """What one rank contributes to an epoch's report: its own units' metrics, its seconds in
    this attempt, the clock it resumed with and its restart's set-up seconds."""

    metrics: list[dict[str, Any]]
    seconds: float
    clock: AttemptClock
    restart_startup_seconds: float


def combine(
    shares: list[WorkerShare], *, units: int, workers: int, total_epochs: int
) -> tuple[dict[str, Any], AttemptClock]:
    """The trial's epoch report and clock from every rank's share."""
    unit_metrics = sorted((m for share in shares for m in share.metrics), key=lambda m: m["unit"])
    clock = shares[0].clock  # every rank resumed from the same checkpoint, so the same clock
    trial_clock = dataclasses.replace(
        clock,
        worker_seconds=clock.worker_seconds + sum(s.seconds for s in shares),
        startup_seconds=max(s.clock.startup_seconds for s in shares),
        ready_at=max(s.clock.ready_at for s in shares),
    )
    report = epoch_report(
        unit_metrics,
        units=units,
        workers=workers,
        total_epochs=total_epochs,
        clock=trial_clock,
        restart_startup_seconds=max(s.restart_startup_seconds for s in shares),
    )
    return report, trial_clock
