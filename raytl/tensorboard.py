"""TensorBoard for a search: scalars per trial and per unit, the HParams dashboard, the refit's images.

The driver writes everything (a Tune callback fed by the trials' reports), so the logs land in the
output folder even when the workers run on other nodes, and only one process writes each file.

Layout under ``DIR/tensorboard/``::

    .                      the HParams experiment: every hyperparameter with its domain, the metrics
    trial_<id>/            one HParams session per trial; the mean (and std) over units per epoch,
                           and when the trial ends ``final/*`` (its last epoch) and ``best/*``
                           (its best epoch by the search's metric, and which epoch that was)
    trial_<id>/<unit>/     each unit's curves: train/val loss, the validation metrics, learning rate
                           per group
    best/                  the refit model: test figures, confusion matrix, misclassified images

HParams entries are written with TensorBoard's own API (``tensorboard.plugins.hparams.summary_v2``),
with discrete domains for choices and integer ranges and real intervals for continuous values, so
the parallel-coordinates and scatter views have their axes before the first trial ends.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams
from torch.utils.tensorboard import SummaryWriter

from raytl.attempts import HISTORY_COLUMNS
from raytl.metrics import TOP5, VAL_METRICS, classification_figures
from raytl.plots import confusion_figure
from raytl.results import trial_status
from raytl.space import ParamSpec

# a trial's curves: the per-epoch values history.parquet keeps, but the bookkeeping ones
TRIAL_SCALARS = tuple(c for c in HISTORY_COLUMNS if c not in ("epoch", "phase", "timestamp"))
UNIT_SCALARS = ("train_loss", *VAL_METRICS, "images_per_second")
# status as a number, so the HParams views can colour and filter by it
# "lost": a trial whose run was written but that Tune never recorded (the driver was killed first);
# the resumed search ran another in its place
STATUS_CODES = {"completed": 2.0, "stopped": 1.0, "error": 0.0, "lost": -1.0}
FINAL_METRICS = (
    *(f"final/{metric}" for metric in VAL_METRICS),
    "final/val_accuracy_std",
    "final/epochs",
    "final/status",
    # the trial's best epoch by the search's metric: what people compare trials by
    *(f"best/{metric}" for metric in VAL_METRICS),
    "best/epoch",
)


def run_name(trial_id: str) -> str:
    return f"trial_{trial_id}"


def hparam(spec: ParamSpec) -> hparams.HParam:
    """A hyperparameter's HParams entry: choices and integer ranges discrete, the rest intervals."""
    domain: hparams.Domain
    if spec.kind in ("const", "choice"):
        values = [
            float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in spec.values
        ]
        domain = hparams.Discrete(values)
    elif spec.kind == "int":
        domain = hparams.Discrete(
            [float(v) for v in range(int(spec.low), int(spec.high) + 1, spec.step)]
        )
    else:
        domain = hparams.RealInterval(float(spec.low), float(spec.high))
    return hparams.HParam(spec.name, domain, display_name=spec.name)


def experiment_summary(space: dict[str, ParamSpec], description: str) -> Summary:
    metrics = [
        hparams.Metric(tag, display_name=tag.split("/")[1], dataset_type=hparams.Metric.VALIDATION)
        for tag in FINAL_METRICS
    ]
    summary = hparams.hparams_config_pb(
        [hparam(spec) for spec in space.values()], metrics, time_created_secs=time.time()
    )
    summary.value[0].metadata.plugin_data.content = _with_description(
        summary.value[0].metadata.plugin_data.content, description
    )
    return summary


def _with_description(content: bytes, description: str) -> bytes:
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    data.experiment.description = description
    return data.SerializeToString()


def session_start_summary(values: dict[str, Any], group: str) -> Summary:
    """A trial's HParams session: its sampled values (ints as numbers, like their domains)."""
    shown = {
        name: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
        for name, v in values.items()
        if v is not None
    }
    return hparams.hparams_pb(shown, trial_id=group, start_time_secs=time.time())


def session_end_summary(status: str) -> Summary:
    """The session's end (TensorBoard's v2 API has no writer for it: built from its protos)."""
    code = api_pb2.STATUS_FAILURE if status in ("error", "lost") else api_pb2.STATUS_SUCCESS
    end = plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time())
    meta = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=end))
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=meta)])


def add_summary(writer: SummaryWriter, summary: Summary) -> None:
    file_writer = writer.file_writer
    assert file_writer is not None  # SummaryWriter opens it in __init__
    file_writer.add_summary(summary)


class SearchBoard:
    """Writes a search's TensorBoard runs; fed one trial report at a time (see :func:`callback`)."""

    def __init__(
        self,
        logdir: Path,
        space: dict[str, ParamSpec],
        description: str = "",
        metric: str = "val_accuracy",
        mode: str = "max",
    ) -> None:
        self.logdir = Path(logdir)
        self.space = space
        self.metric, self.mode = metric, mode
        self._writers: dict[str, SummaryWriter] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._best: dict[str, dict[str, Any]] = {}
        root = self._writer(".")
        add_summary(root, experiment_summary(space, description))
        root.flush()

    def _writer(self, run: str) -> SummaryWriter:
        if run not in self._writers:
            self._writers[run] = SummaryWriter(str(self.logdir / run), flush_secs=10)
        return self._writers[run]

    def result(self, trial_id: str, hparams: dict[str, Any], result: dict[str, Any]) -> None:
        """One epoch's report of a trial: trial means, per-unit curves, the session start once."""
        run = run_name(trial_id)
        writer = self._writer(run)
        if trial_id not in self._last:
            add_summary(writer, session_start_summary(hparams, group=run))
        self._last[trial_id] = result
        if self._better(result, self._best.get(trial_id)):
            self._best[trial_id] = result
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        for key in TRIAL_SCALARS:
            value = result.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                writer.add_scalar(key, value, step)
        units: dict[str, dict[str, float]] = {}
        for key, value in result.items():
            if key.startswith("unit/") and isinstance(value, int | float):
                _, unit, metric = key.split("/", 2)
                units.setdefault(unit, {})[metric] = value
        for unit, metrics in units.items():
            unit_writer = self._writer(f"{run}/{unit}")
            for metric, value in metrics.items():
                if metric in UNIT_SCALARS or metric.startswith("lr/"):
                    unit_writer.add_scalar(metric, value, step)
        writer.flush()

    def _better(self, result: dict[str, Any], best: dict[str, Any] | None) -> bool:
        value = result.get(self.metric)
        if not isinstance(value, int | float) or math.isnan(value):
            return False
        if best is None:
            return True
        return value > best[self.metric] if self.mode == "max" else value < best[self.metric]

    def end(self, trial_id: str, status: str) -> None:
        """A trial ended (completed, stopped by the scheduler, or failed): final metrics + session end."""
        run = run_name(trial_id)
        writer = self._writer(run)
        last = self._last.get(trial_id, {})
        step = int(last.get("epoch") or 0)
        best = self._best.get(trial_id, {})
        # top-5 accuracy only where the trial recorded it (more than 5 classes)
        metrics = [m for m in VAL_METRICS if m != TOP5 or TOP5 in last]
        finals = {
            **{f"final/{m}": last.get(m, math.nan) for m in metrics},
            "final/val_accuracy_std": last.get("val_accuracy_std", math.nan),
            "final/epochs": float(step),
            "final/status": STATUS_CODES[status],
            **{f"best/{m}": best.get(m, math.nan) for m in metrics},
            "best/epoch": float(best.get("epoch") or math.nan),
        }
        for tag, value in finals.items():
            writer.add_scalar(tag, value, step)
        add_summary(writer, session_end_summary(status))
        writer.flush()
        for name in [r for r in self._writers if r == run or r.startswith(run + "/")]:
            self._writers.pop(name).close()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class TensorBoardCallback(Callback):
    """A Ray Tune callback that writes the search's TensorBoard runs from the driver.

    Tune pickles its callbacks with the experiment state, so the writers (which hold locks and
    open files) are created on first use and never pickled.
    """

    def __init__(
        self, logdir: Path, space: dict[str, ParamSpec], description: str, metric: str, mode: str
    ) -> None:
        self.logdir, self.space, self.description = logdir, space, description
        self.metric, self.mode = metric, mode
        self._board: SearchBoard | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_board": None}

    @property
    def board(self) -> SearchBoard:
        if self._board is None:
            self._board = SearchBoard(
                self.logdir, self.space, self.description, self.metric, self.mode
            )
        return self._board

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if "epoch" in result:
            self.board.result(trial.trial_id, dict(trial.config), result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.board.end(trial.trial_id, trial_status(trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.board.end(trial.trial_id, "error")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        """Close the writers; after a resume, end the runs of trials Tune no longer knows as lost
        (they started after its last saved state, then the driver died), so that every session
        on the HParams dashboard has an end and none passes for a finished trial."""
        known = {run_name(trial.trial_id) for trial in trials}
        for run in sorted(Path(self.logdir).glob("trial_*")):
            if run.is_dir() and run.name not in known:
                self.board.end(run.name.removeprefix("trial_"), "lost")
        if self._board is not None:
            self._board.close()


def tensorboard_callback(
    logdir: Path,
    space: dict[str, ParamSpec],
    description: str,
    metric: str = "val_accuracy",
    mode: str = "max",
) -> Callback:
    return TensorBoardCallback(logdir, space, description, metric, mode)


def write_refit_images(
    logdir: Path,
    class_names: list[str],
    labels: list[int],
    predictions: list[int],
    images: Any,
    max_images: int = 16,
) -> None:
    """The refit model's test figures (accuracy, balanced accuracy, macro-F1), its confusion
    matrix and a few misclassified test images, under ``best/``."""
    writer = SummaryWriter(str(Path(logdir) / "best"))
    try:
        writer.add_figure(
            "test/confusion_matrix", confusion_figure(labels, predictions, class_names), 0
        )
        wrong = [i for i, (y, p) in enumerate(zip(labels, predictions, strict=True)) if y != p]
        for n, i in enumerate(wrong[:max_images]):
            tag = f"test/misclassified/{n:02d}_true_{class_names[labels[i]]}_pred_{class_names[predictions[i]]}"
            writer.add_image(tag.replace(" ", "_"), np.asarray(images[i]), 0, dataformats="HWC")
        for name, value in classification_figures(np.array(labels), np.array(predictions)).items():
            writer.add_scalar(f"test/{name}", value, 0)  # accuracy, balanced_accuracy, macro_f1
    finally:
        writer.close()
