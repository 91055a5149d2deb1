"""The Ray Tune side of a search: the Optuna searcher, the ASHA scheduler, the live progress line,
and the Tuner (new, or restored from its experiment folder to resume).

The Tune trial reserves no CPU: it only drives its TorchTrainer, whose workers ask for their own
CPUs/GPUs, or (a lean trial) trains a linear head on cached features, which is light. A CPU held
by Tune would be one Ray Train cannot get: Tune stages placement groups for upcoming trials, and a
2-worker trial on 2 cores would wait forever. Ray refuses an empty request, hence one byte of memory.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from raytl import console
from raytl.config import SpaceConfig
from raytl.errors import RaytlError
from raytl.rundir import read_trial_clock, tick_trial_clock
from raytl.space import DefineByRun
from raytl.storage import is_uri, join_location
from raytl.tensorboard import tensorboard_callback
from raytl.trial import SearchInputs, run_trial

EXPERIMENT = "tune"
TRIAL_RESOURCES: dict[str, float] = {"CPU": 0, "memory": 1}  # see the module docstring


def echo_line(line: str) -> None:
    """The default ``echo``: a module function, so Tune can pickle the callbacks that hold it (Ray
    swaps ``builtins.print`` during a run, after which the old ``print`` no longer pickles); the
    line goes to raytl's console (:mod:`raytl.console`), not to Ray's log."""
    console.say(line)


class PruningOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch``, except that a trial the scheduler stopped before its last epoch
    enters the Optuna study as PRUNED (keeping the intermediate values reported each epoch), not
    as COMPLETE with its truncated score: TPE then ranks it by how far it got, and learns "short"
    where Ray's searcher would teach it "bad configuration". Its last report (which Tune hands to
    ``on_trial_complete`` only) becomes its last intermediate value, so its value in the study."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        stopped_early = (
            result is not None
            and not error
            and trial_id not in self._completed_trials
            and result.get("epoch", 0) < result.get("total_epochs", 0)
        )
        if not stopped_early:
            super().on_trial_complete(trial_id, result, error)
            return
        study = self._ot_study
        assert study is not None  # set up before the first trial
        with warnings.catch_warnings():  # Optuna warns (and keeps the first) if already reported
            warnings.simplefilter("ignore")
            self.on_trial_result(trial_id, result)
        study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def make_searcher(config: SpaceConfig) -> OptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    s = config.search
    sampler: optuna.samplers.BaseSampler
    if s.sampler == "tpe":
        # multivariate TPE models parameters jointly; group=True keeps that working when some
        # parameters exist only for some strategies (otherwise it silently samples independently)
        sampler = optuna.samplers.TPESampler(
            seed=s.seed,
            multivariate=True,
            group=True,
            n_startup_trials=min(4, s.trials) if s.trials > 0 else 4,
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    return PruningOptunaSearch(  # the seeded recipes first (raytl.seeds), then the sampler
        space=DefineByRun(config.space, config.blocks),
        metric=s.metric,
        mode=s.mode,
        sampler=sampler,
        points_to_evaluate=config.seed_points() or None,
    )


def make_scheduler(config: SpaceConfig) -> TrialScheduler:
    s = config.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="rung_epoch",  # a converged probe's report meets no rung (raytl.strategies)
        max_t=s.max_epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds >= 90 else f"{seconds:.0f}s"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class ProgressLine(tune.Callback):
    """One line per trial result, with the search's state (trials done, running and queued, the
    best so far and its strategy, the time left at the pace so far); on a terminal also a live
    bar of trials done. It keeps the driver's clock per trial in the output folder (launched,
    finished), which ``raytl resume`` reads back."""

    def __init__(
        self,
        total: int,
        metric: str,
        mode: str,
        output: Path,
        echo: Callable[[str], None],
        budget_s: float | None = None,
    ) -> None:
        """``total``: the trials (-1: as many as the time budget ``budget_s`` allows)."""
        self.total, self.metric, self.mode, self.output, self.echo = (
            total,
            metric,
            mode,
            output,
            echo,
        )
        self.budget_s = budget_s
        self.best: float | None = None
        self.best_strategy = ""
        self.started = time.perf_counter()
        self.finished = 0
        self._bar: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks; a bar does not
        return {**self.__dict__, "_bar": None}

    def _state(self, trials: list[Any]) -> str:
        """'3/8 done, 2 running, 3 queued, best 0.9500 (fine_tune), ~2m left'."""
        running = sum(t.status == "RUNNING" for t in trials)
        elapsed = time.perf_counter() - self.started
        left = (
            elapsed / self.finished * (self.total - self.finished)
            if 0 < self.finished < self.total
            else None
        )
        if self.budget_s is not None:
            left = min(left or math.inf, max(0.0, self.budget_s - elapsed))
        until = f", ~{_duration(left)} left" if left is not None else ""
        best = f", best {self.best:.4f} ({self.best_strategy})" if self.best is not None else ""
        if self.total < 0:  # only the budget bounds the search
            return f"{self.finished} done, {running} running{best}{until} of the time budget"
        queued = max(0, self.total - self.finished - running)
        return f"{self.finished}/{self.total} done, {running} running, {queued} queued{best}{until}"

    def _show(self, trials: list[Any]) -> None:
        if not console.is_terminal():
            return
        if self._bar is None:
            self._bar = console.bar(self.total if self.total > 0 else None, "trials", unit="trial")
        self._bar.n = self.finished
        self._bar.set_postfix_str(self._state(trials).split(", ", 1)[1], refresh=True)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        """At the start, and again on resume: the trials that finished before count as done."""
        self.finished = sum("finished_at" in t for t in read_trial_clock(self.output).values())

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        tick_trial_clock(self.output, trial.trial_id, "launched_at")

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        value = result.get(self.metric)
        if value is None:
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
            self.best_strategy = str(trial.config.get("strategy", ""))
        config = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
        self.echo(
            f"[{time.perf_counter() - self.started:6.0f}s] {trial.trial_id} epoch "
            f"{result.get('epoch')}/{result.get('total_epochs')} {self.metric} {value:.4f} "
            f"(±{result.get(self.metric + '_std', 0):.4f}) | {self._state(trials)} | {config}"
        )
        self._show(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.finished += 1
        tick_trial_clock(self.output, trial.trial_id, "finished_at")
        self._show(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.finished += 1
        tick_trial_clock(self.output, trial.trial_id, "finished_at")
        self.echo(f"trial {trial.trial_id} failed: see {trial.path}")
        self._show(trials)


def check_trusted(experiment: str, trust_storage: bool) -> None:
    """Resuming unpickles Tune's experiment state (``tuner.pkl``, the searcher's state): whoever
    can write those files can run code in this process. So a local experiment must belong to this
    user and be writable by nobody else, and one on a URI needs ``--trust-storage``."""
    if is_uri(experiment):
        if not trust_storage:
            raise RaytlError(
                f"{experiment}: resuming unpickles the experiment's state, which runs code as you; "
                "pass --trust-storage if only you (and those you trust) can write that storage"
            )
        return
    folder = Path(experiment)
    for path in [folder, *folder.glob("*.pkl"), *folder.glob("*.json")]:
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise RaytlError(
                f"{path}: resuming unpickles the experiment's state, which runs code as you, and "
                "this file belongs to someone else or others can write it; refusing to load it"
            )


def make_tuner(
    inputs: SearchInputs,
    output: Path,
    *,
    resume: bool,
    echo: Callable[[str], None],
    trust_storage: bool = False,
) -> tune.Tuner:
    """A new Tuner for the search, or (``resume``) the one restored from its experiment folder:
    finished trials kept, unfinished ones resumed from their checkpoints, the Optuna study with it."""
    config = inputs.config
    trainable = tune.with_resources(tune.with_parameters(run_trial, inputs=inputs), TRIAL_RESOURCES)
    experiment = join_location(inputs.storage, EXPERIMENT)
    s = config.search
    callbacks = [
        ProgressLine(s.trials, s.metric, s.mode, output, echo, s.time_budget_s),
        tensorboard_callback(output / "tensorboard", config.space, config.name, s.metric, s.mode),
    ]
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise RaytlError(
                f"{output}: no interrupted search to resume (no Tune experiment at {experiment})"
            )
        check_trusted(experiment, trust_storage)
        echo(f"resuming the search in {experiment}")
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
        # raytl's own callbacks are built anew, not taken from the pickle (theirs hold the paths
        # of the run that wrote it); Tuner.restore takes no run config, hence the inner object
        tuner._local_tuner._run_config.callbacks = callbacks  # type: ignore[union-attr]
        return tuner
    if tune.Tuner.can_restore(experiment):
        raise RaytlError(
            f"{experiment} already holds a search; `raytl resume {output}` continues it, or "
            "choose another --output"
        )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(config),
            scheduler=make_scheduler(config),
            metric=s.metric,
            mode=s.mode,
            num_samples=s.trials,
            max_concurrent_trials=s.max_concurrent,
            time_budget_s=s.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=inputs.storage,
            verbose=0,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
        ),
    )
