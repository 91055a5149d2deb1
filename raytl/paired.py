"""``raytl compare --paired K``: the paired fidelity study of the evaluation schemes.

A scheme's own search tries its own configurations, so the rank correlations of separate searches
are measured on different sets. Here K configurations are drawn once per repeat (Optuna's random
sampler over the space, seeded), and every scheme scores all K: they are its search's enqueued
trials (``search.seed_configs``), run for the same epochs under Tune's FIFO scheduler (no early
stopping). Each configuration is then refit once on the whole pool and tested once on the
untouched test split, so every scheme's validation scores stand against the same K test
accuracies (:mod:`raytl.paired_stats` turns them into intervals and a rule).

Sweeps: ``repeats`` re-draws the configurations, the search seed and the splits (``data.seed``
+ r); ``pool_sizes`` runs the study on stratified pools of each size, tested on the same test
split (``data.pool_size``); ``segments`` runs the segments scheme with each number of segments.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from raytl import plots
from raytl.cluster import ray_session
from raytl.compare import (
    config_key,
    machine_description,
    measure_on_test,
    prepare_comparison,
    search_scheme,
)
from raytl.config import SpaceConfig
from raytl.console import LOG_NAME, ray_output_to
from raytl.errors import RaytlError
from raytl.paired_stats import BOOTSTRAP, bootstrap_intervals, paired_summary, rule_lines
from raytl.report import markdown_table, save_figure
from raytl.results import write_parquet
from raytl.search import Echo, share_inputs
from raytl.space import DefineByRun
from raytl.storage import atomic_write
from raytl.trial import scheme_units
from raytl.tune import echo_line

PAIRED_OUTPUTS = (
    "paired.parquet",
    "paired_trials.parquet",
    "paired_intervals.parquet",
    "paired_tau.png",
    "paired_cost_regret.png",
    "paired_val_vs_test.png",
)


def draw_configurations(config: SpaceConfig, k: int, seed: int) -> list[dict[str, Any]]:
    """``k`` distinct configurations of the space's searched hyperparameters, drawn by Optuna's
    random sampler (seeded) through the same define-by-run function the searches use."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    define = DefineByRun(config.space, config.blocks)
    points: dict[str, dict[str, Any]] = {}
    for _ in range(100 * k):
        trial = study.ask()
        define(trial)
        points.setdefault(config_key(trial.params), dict(trial.params))
        if len(points) == k:
            return list(points.values())
    raise RaytlError(
        f"--paired {k}: the space offers only {len(points)} distinct configuration(s) "
        f"(searched: {', '.join(sorted(trial.params)) or 'nothing'}); lower K or widen the space"
    )


def split_config(
    config: SpaceConfig, scheme: str, repeat: int, pool_size: int | None, segments: int
) -> SpaceConfig:
    """The data and scheme of one run of the study: repeat ``repeat``'s splits (``data.seed`` +
    repeat) of a pool of ``pool_size``, under ``scheme`` (with ``segments`` segments)."""
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, seed=config.data.seed + repeat, pool_size=pool_size),
        scheme=dataclasses.replace(config.scheme, kind=scheme, segments=segments),
    )


def cell_config(
    config: SpaceConfig,
    scheme: str,
    points: list[dict[str, Any]],
    repeat: int,
    pool_size: int | None,
    segments: int,
) -> SpaceConfig:
    """One scheme's run of the study (:func:`split_config`): the K points as its only trials,
    every one for ``max_epochs`` (FIFO), with repeat ``repeat``'s search seed."""
    split = split_config(config, scheme, repeat, pool_size, segments)
    return dataclasses.replace(
        split,
        search=dataclasses.replace(
            config.search,
            seed=config.search.seed + repeat,
            seed_configs=points,
            num_samples=len(points),
            time_budget_s=None,
            scheduler="fifo",
        ),
    )


def scheme_label(scheme: str, segments: int, sweep: Sequence[int]) -> str:
    """``segments_4`` when the study sweeps the number of segments, else the scheme's name."""
    return f"{scheme}_{segments}" if scheme == "segments" and len(sweep) > 1 else scheme


def run_paired(
    config: SpaceConfig,
    output: Path,
    k: int,
    *,
    schemes: Sequence[str],
    repeats: int = 1,
    pool_sizes: Sequence[int | None] = (None,),
    segments: Sequence[int] = (),
    address: str | None = None,
    echo: Echo = echo_line,
    verbose: bool = False,
) -> pd.DataFrame:
    """Run the study (every pool size x repeat x scheme), write compare.md, the tables and the
    plots to ``output``; returns the per-scheme intervals."""
    if k < 3:
        raise RaytlError(f"--paired: expected 3 or more configurations, got {k}")
    started = time.perf_counter()
    output, data = prepare_comparison(config, output, repeats)
    sweep = list(segments) or [config.scheme.segments]
    cells = [
        (pool_size, scheme, count)
        for pool_size in pool_sizes
        for scheme in schemes
        for count in (sweep if scheme == "segments" else [config.scheme.segments])
    ]
    for pool_size, scheme, count in cells:  # every split possible, before any trial runs
        scheme_units(split_config(config, scheme, 0, pool_size, count), data)
    if not verbose:
        echo(f"Ray's and Tune's own output: {output / LOG_NAME} (--verbose shows it here)")
    tables: list[pd.DataFrame] = []
    with ray_output_to(output / LOG_NAME, verbose=verbose), ray_session(address):
        shared = share_inputs(config, data, output, echo)
        for pool_size in pool_sizes:
            for repeat in range(repeats):
                points = draw_configurations(config, k, config.search.seed + repeat)
                runs = {}
                for scheme, count in [(s, c) for p, s, c in cells if p == pool_size]:
                    cell = cell_config(config, scheme, points, repeat, pool_size, count)
                    label = scheme_label(scheme, count, sweep)
                    name = f"{label}_pool{pool_size or 'all'}_repeat{repeat}"
                    runs[label] = search_scheme(shared, data, output, cell, name, echo)
                    runs[label]["scheme"] = label
                measure_on_test(shared, cell, runs, None, echo)
                pool = len(cell.data.split_test(data)[0])
                for table in runs.values():
                    table["pool_size"], table["repeat"] = pool, repeat
                tables += runs.values()
    trials = pd.concat(tables, ignore_index=True)
    intervals = write_paired(output, config, data, trials, k, time.perf_counter() - started)
    echo(f"paired study written to {output / 'compare.md'}")
    return intervals


def paired_markdown(
    config: SpaceConfig,
    data: Any,
    trials: pd.DataFrame,
    summary: pd.DataFrame,
    intervals: pd.DataFrame,
    k: int,
    seconds: float,
) -> list[str]:
    """compare.md of a paired study: what it supports first, then the tables and plots."""
    costs = summary.groupby(["pool_size", "scheme"], sort=False)[
        ["worker_seconds", "wall_seconds", "score_std", "selected_test_accuracy", "regret"]
    ].mean()
    s = config.search
    lines = [
        f"# Evaluation schemes compared on the same configurations: {config.name}",
        "",
        f"Data: {data.source}, {len(data)} images, {len(data.class_names)} classes, "
        f"{config.data.image_size} px, test fraction {config.data.test_fraction} (carved per "
        f"repeat, never seen by a scheme). Model: {config.model.backbone} "
        f"({config.model.pretrained}). {k} configurations drawn per repeat (Optuna's random "
        f"sampler, seed {s.seed} + repeat), each scored by every scheme for {s.max_epochs} "
        f"epoch(s) with no early stopping, {s.max_concurrent} at once, then refit on the whole "
        "pool and tested once. Schemes: "
        + ", ".join(dict.fromkeys(trials["scheme"]))
        + f" (cv {config.scheme.folds} folds, holdout val fraction {config.data.val_fraction}).",
        f"Machine: {machine_description()}. Whole study: {seconds:.0f} s.",
        "",
        "## What the study supports",
        "",
        *[f"- {line}" for line in rule_lines(intervals, summary)],
        "",
        "## Rank correlation with test accuracy, 95% bootstrap intervals",
        "",
        markdown_table(intervals),
        "",
        "Intervals: a paired bootstrap over configurations (the same draw for every scheme, "
        "within each repeat; the mean over repeats), percentiles 2.5 and 97.5 of "
        f"{BOOTSTRAP} draws. `*_minus_cv`: the scheme's correlation minus cv's on the same draw.",
        "",
        "## Cost and selection (means over repeats)",
        "",
        markdown_table(costs.reset_index()),
        "",
        "selected_test_accuracy: the test accuracy of the configuration with the scheme's best "
        f"{config.search.metric}; regret: how far below the best of the K; score_std: the spread of a "
        "configuration's score across the scheme's units.",
        "",
        "## Per repeat",
        "",
        markdown_table(summary),
        "",
        "![Kendall tau with intervals](paired_tau.png)",
        "",
        "![regret against worker-seconds](paired_cost_regret.png)",
        "",
        "![validation score against test accuracy](paired_val_vs_test.png)",
        "\nEach scheme's run (results, report, TensorBoard runs) is under `runs/`.",
    ]
    return lines


def write_paired(
    output: Path, config: SpaceConfig, data: Any, trials: pd.DataFrame, k: int, seconds: float
) -> pd.DataFrame:
    """paired.parquet (per pool size, repeat and scheme), paired_trials.parquet,
    paired_intervals.parquet, the three plots and compare.md."""
    metric = config.search.metric
    summary = paired_summary(trials, metric)
    intervals = bootstrap_intervals(trials, metric, seed=config.search.seed)
    for name, frame in (
        ("paired.parquet", summary),
        ("paired_trials.parquet", trials),
        ("paired_intervals.parquet", intervals),
    ):
        write_parquet(output / name, frame)
    save_figure(plots.paired_tau(intervals), output / "paired_tau.png")
    save_figure(plots.paired_cost_regret(summary), output / "paired_cost_regret.png")
    save_figure(plots.scheme_val_vs_test(trials, metric), output / "paired_val_vs_test.png")
    lines = paired_markdown(config, data, trials, summary, intervals, k, seconds)
    atomic_write(output / "compare.md", "\n".join(lines) + "\n")
    return intervals
