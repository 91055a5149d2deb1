"""``raytl search``: Ray Tune + OptunaSearch (define-by-run, conditional) + ASHA over Ray Train trials.

The recipe reads top to bottom in :func:`run_search`: record the run and load the data once, put it
in Ray's object store (and the frozen features beside it), run the Tuner, write the results table,
refit the best configuration on train+val and test it once, write the report and publish.
``raytl compare`` reuses the steps below it on one shared copy of the data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import ray

from raytl import warm_workers
from raytl.cluster import check_resources, ray_session
from raytl.config import SpaceConfig
from raytl.console import LOG_NAME, ray_output_to
from raytl.data.dataset import ImageData
from raytl.ensemble import ensemble_best
from raytl.errors import RaytlError
from raytl.features import prepare_feature_cache
from raytl.latency import COLUMNS, measure_backbones, within_limits
from raytl.metrics import check_metric
from raytl.models import to_json
from raytl.refit import refit_best
from raytl.report import write_report
from raytl.results import best_row, format_top, history_table, results_table, write_results
from raytl.rundir import (
    END_FILE,
    check_free_space,
    check_same_data,
    check_storage,
    ensure_marker,
    publish,
    read_trial_clock,
    write_skipped,
    write_space,
)
from raytl.storage import atomic_write, join_location
from raytl.trial import SearchInputs, scheme_units, with_units
from raytl.tune import echo_line, make_tuner

Echo = Callable[[str], None]


def run_search(
    config: SpaceConfig,
    output: Path,
    *,
    address: str | None = None,
    echo: Echo = echo_line,
    resume: bool = False,
    trust_storage: bool = False,
    verbose: bool = False,
) -> pd.DataFrame:
    """Run the whole search into ``output`` and return the results table.

    ``resume=True`` continues the search whose Tune experiment is on the storage (the driver was
    killed, the machine rebooted): finished trials are kept, unfinished ones resume from their last
    checkpoints, the searcher's state (the Optuna study) is restored with it, and only the missing
    trials are sampled, so the search still ends with exactly ``num_samples`` trials.

    While Ray runs, its and Tune's own output go to ``OUTPUT/ray-output.log`` (``verbose``: to
    the console as well as raytl's lines, :mod:`raytl.console`).
    """
    started = time.perf_counter()
    output = Path(output).resolve()
    echo(f"run {config.name}-{ensure_marker(output).run_id}: output in {output}")
    if not verbose:
        echo(f"Ray's and Tune's own output: {output / LOG_NAME} (--verbose shows it here)")
    check_free_space(output)
    check_storage(config.search.storage)
    if not resume:
        write_space(output, config)
    data = config.data.load()
    check_metric(config.search.metric, len(data.class_names))
    record_data(config, output, data, resume=resume, echo=echo)
    with ray_output_to(output / LOG_NAME, verbose=verbose), ray_session(address):
        check_resources(config)
        inputs = share_inputs(config, data, output, echo)
        costs = measure_backbones(config, len(data.class_names))
        for backbone, figures in costs.items():
            echo(
                f"model cost: {backbone}: {figures['params'] / 1e6:.2f}M parameters, "
                f"{figures['latency_ms_batch1']:.1f} ms at batch 1, "
                f"{figures['latency_ms_batch64']:.0f} ms at batch 64 ({config.data.image_size} px)"
            )
        table = tune_search(
            inputs, output, resume=resume, echo=echo, trust_storage=trust_storage, costs=costs
        )
        best = pick(table, config)
        if best is not None:
            final = ensemble_best if config.search.final == "fold_ensemble" else refit_best
            final(inputs, data, best, output, echo)
        report = finish_run(config, output, inputs.storage)
    echo(
        f"search finished in {time.perf_counter() - started:.0f}s; results in {output}, "
        f"report in {report}"
    )
    echo(f"review the trials: tensorboard --logdir {output / 'tensorboard'} --host 127.0.0.1")
    return table


def storage_for(config: SpaceConfig, output: Path) -> str:
    """Where the Tune experiment and the checkpoints go: ``OUTPUT/ray``, or on ``search.storage``
    a folder of this run's own, ``<storage>/<name>-<run id>`` (the run id is in the output
    folder's marker), so that two runs on one storage never mix."""
    if not config.search.storage:
        return join_location(Path(output) / "ray")
    return join_location(config.search.storage, f"{config.name}-{ensure_marker(output).run_id}")


def cache_root(config: SpaceConfig, output: Path) -> str:
    """Where the frozen features are cached: beside the experiments, shared by every run on the
    storage (an entry is keyed by everything the features depend on)."""
    return join_location(config.search.storage or Path(output) / "ray", "feature_cache")


def record_data(
    config: SpaceConfig, output: Path, data: ImageData, *, resume: bool, echo: Echo
) -> None:
    """The data's fingerprint and skipped files in the output folder; the scheme's units checked
    against the classes (one line now, not an error in every trial)."""
    check_same_data(output, data, resume)
    write_skipped(output, data)
    scheme_units(config, data)
    echo(
        f"data: {data.source}: {len(data)} images, {len(data.class_names)} classes, "
        f"fingerprint {data.fingerprint}; scheme {config.scheme.kind} "
        f"({config.scheme.size} unit(s)); {trials_line(config)}, "
        f"{config.resources.workers_per_trial} worker(s) each"
    )
    if data.note:
        echo(f"data: {data.note}")
    if data.duplicates:
        echo(
            f"data: {data.duplicates} file(s) byte-identical to another: each kept on the same "
            "side of every split as its original (raytl data inspect lists them)"
        )


def with_costs(table: pd.DataFrame, costs: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Each trial's model size and latency (:mod:`raytl.latency`), by its backbone."""
    table = table.copy()
    for column in COLUMNS:
        table[column] = [costs.get(b, {}).get(column, float("nan")) for b in table["backbone"]]
    return table


def pick(table: pd.DataFrame, config: SpaceConfig) -> pd.Series | None:
    """The best trial whose model fits ``search.max_latency_ms`` / ``max_params``; an error
    naming the limits when none does (results.parquet is written by then)."""
    s = config.search
    if not len(table) or (s.max_latency_ms is None and s.max_params is None):
        return best_row(table, s.metric)
    fits = table[[within_limits(r, s.max_latency_ms, s.max_params) for _, r in table.iterrows()]]
    if len(table[table["status"] != "error"]) and not len(fits):
        raise RaytlError(
            f"no trial's model fits search.max_latency_ms={s.max_latency_ms} / "
            f"max_params={s.max_params}: the smallest measured were "
            f"{table['latency_ms_batch1'].min():.1f} ms and {table['params'].min():.0f} parameters "
            "(results.parquet has every trial's)"
        )
    return best_row(fits, s.metric)


def trials_line(config: SpaceConfig) -> str:
    """'8 trials', '8 trials or 600 s', 'trials for 600 s'."""
    s = config.search
    budget = f"{s.time_budget_s:.0f} s" if s.time_budget_s else ""
    if s.trials < 0:
        return f"trials for {budget}"
    return f"{s.trials} trials" + (f" or {budget}, whichever ends first" if budget else "")


def share_inputs(config: SpaceConfig, data: ImageData, output: Path, echo: Echo) -> SearchInputs:
    """One copy of the data in the object store, and the frozen features computed (or read)
    once per backbone, for every trial of one or more searches writing to ``output``."""
    data_ref = ray.put(data)
    features = prepare_feature_cache(config, data, data_ref, cache_root(config, output), echo)
    return SearchInputs(config, data_ref, storage_for(config, output), features)


def tune_search(
    inputs: SearchInputs,
    output: Path,
    *,
    resume: bool,
    echo: Echo,
    trust_storage: bool = False,
    costs: dict[str, dict[str, float]] | None = None,
) -> pd.DataFrame:
    """Run the Tuner and write ``results.parquet`` (with each model's ``costs``, when measured,
    :func:`with_costs`) and ``history.parquet``; a search whose every trial failed is an error
    (after its results are written)."""
    config = inputs.config
    warm_workers.prestart_for_search(config)  # the first trials' Train processes
    inputs = with_units(inputs)
    tuner = make_tuner(inputs, output, resume=resume, echo=echo, trust_storage=trust_storage)
    started = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - started
    table = results_table(grid, config, clock=read_trial_clock(output))
    if costs is not None:
        table = with_costs(table, costs)
    write_results(output, table, history_table(grid))
    budget = config.search.time_budget_s
    ended_by_budget = budget is not None and seconds >= budget
    atomic_write(
        output / END_FILE,
        to_json(
            {
                "ended_by": "time_budget" if ended_by_budget else "trials",
                "seconds": seconds,
                "time_budget_s": budget,
                "trials": len(table),
            }
        ),
    )
    if ended_by_budget:
        echo(
            f"the time budget ({budget:.0f} s) ended the search after {len(table)} trials; "
            "the trials still running were stopped at their last report"
        )
    if len(table) and (table["status"] == "error").all():
        first = table["error"].dropna()
        raise RaytlError(
            f"every trial failed ({len(table)} of {len(table)}); the first error: "
            f"{first.iloc[0] if len(first) else 'unknown'} (results.parquet in {output}; each "
            f"trial's error.txt under {inputs.storage})"
        )
    echo("")
    echo(format_top(table, config.search.metric))
    return table


def finish_run(config: SpaceConfig, output: Path, storage: str) -> Path:
    """The report, and the reviewable outputs copied beside the experiment in ``storage`` when the
    search writes to a ``search.storage``."""
    report = write_report(output)
    if config.search.storage:
        publish(output, storage)
    return report
