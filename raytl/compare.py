"""``raytl compare``: the same search under each evaluation scheme, scored against untouched test data.

Each scheme runs the space with the same seeds and trial budget, on one shared copy of the data
(and of the frozen features) in the object store. Afterwards, for analysis only (the searches never
see it), every distinct configuration a scheme tried is refit on the whole training pool and tested
once. That gives each scheme two kinds of figures (:mod:`raytl.compare_figures`):

* cost: wall seconds, worker-seconds, trials completed, epochs run;
* fidelity: how well its validation score ranks configurations by test accuracy (Kendall tau,
  Spearman), the test accuracy of the configuration it would pick, and that pick's regret against the
  best test accuracy any scheme found in the same repeat.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch

from raytl import plots
from raytl.cluster import check_resources, ray_session
from raytl.compare_figures import aggregate, scheme_scores, selected_index, summarize, verdict
from raytl.config import SpaceConfig
from raytl.console import LOG_NAME, ray_output_to
from raytl.data.dataset import ImageData
from raytl.ensemble import EnsembleResult, checkpoint_location, remote_fold_ensemble
from raytl.errors import RaytlError
from raytl.metrics import check_metric
from raytl.refit import RefitResult, remote_refit, searched_passes
from raytl.report import markdown_table, save_figure
from raytl.results import sampled_values, write_parquet
from raytl.rundir import check_storage, write_skipped, write_space
from raytl.schemes import SCHEMES
from raytl.search import Echo, finish_run, record_data, share_inputs, trials_line, tune_search
from raytl.storage import atomic_write, join_location
from raytl.trial import SearchInputs
from raytl.tune import echo_line

# what ``raytl compare --overwrite`` clears (in a folder raytl made, see raytl.rundir)
COMPARE_OUTPUTS = (
    "runs",
    "ray",
    "space.yaml",
    "skipped.txt",
    "compare.md",
    "compare.parquet",
    "compare_trials.parquet",
    "compare_val_vs_test.png",
    "compare_cost_fidelity.png",
)


def config_key(sampled: dict[str, Any]) -> str:
    """A stable key for one configuration, so schemes that tried the same one share its refit."""
    return json.dumps({k: sampled[k] for k in sorted(sampled)}, sort_keys=True, default=str)


def run_name(scheme: str, seed: int) -> str:
    return f"{scheme}_seed{seed}"


def scheme_config(config: SpaceConfig, scheme: str, seed: int) -> SpaceConfig:
    """The space with another scheme and search seed; everything else (data, test split) unchanged."""
    return dataclasses.replace(
        config,
        scheme=dataclasses.replace(config.scheme, kind=scheme),
        search=dataclasses.replace(config.search, seed=seed),
    )


def parse_schemes(text: str) -> list[str]:
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    wrong = [s for s in schemes if s not in SCHEMES]
    if wrong or not schemes:
        named = ", ".join(wrong) if wrong else repr(text)
        raise RaytlError(
            f"--schemes: {named} is not a scheme; "
            f"expected a comma-separated list of {', '.join(SCHEMES)}"
        )
    if len(set(schemes)) != len(schemes):
        raise RaytlError(f"--schemes: {text!r} names a scheme twice")
    return schemes


def prepare_comparison(config: SpaceConfig, output: Path, repeats: int) -> tuple[Path, ImageData]:
    """What every comparison does before Ray starts: its inputs checked, space.yaml and
    skipped.txt written, the data loaded once for all of its runs."""
    if repeats < 1:
        raise RaytlError(f"--repeats: expected 1 or more, got {repeats}")
    output = Path(output).resolve()
    check_storage(config.search.storage)
    write_space(output, config)
    data = config.data.load()
    check_metric(config.search.metric, len(data.class_names))
    write_skipped(output, data)
    return output, data


def run_compare(
    config: SpaceConfig,
    output: Path,
    *,
    schemes: Sequence[str] = tuple(SCHEMES),
    repeats: int = 1,
    refit_sample: int | None = None,
    address: str | None = None,
    echo: Echo = echo_line,
    verbose: bool = False,
) -> pd.DataFrame:
    """Run the space once per scheme and repeat, refit the configurations, write the comparison
    (Ray's and Tune's own output in ``OUTPUT/ray-output.log`` unless ``verbose``)."""
    started = time.perf_counter()
    output, data = prepare_comparison(config, output, repeats)
    if not verbose:
        echo(f"Ray's and Tune's own output: {output / LOG_NAME} (--verbose shows it here)")
    with ray_output_to(output / LOG_NAME, verbose=verbose), ray_session(address):
        shared = share_inputs(config, data, output, echo)
        trials = [
            table
            for repeat in range(repeats)
            for table in compare_once(shared, data, output, schemes, repeat, refit_sample, echo)
        ]
    trial_table = pd.concat(trials, ignore_index=True)
    summary = summarize(trial_table, config.search.metric)
    write_compare(output, config, data, trial_table, summary, time.perf_counter() - started)
    echo(f"comparison written to {output / 'compare.md'}")
    return summary


def compare_once(
    shared: SearchInputs,
    data: ImageData,
    output: Path,
    schemes: Sequence[str],
    repeat: int,
    refit_sample: int | None,
    echo: Echo,
) -> list[pd.DataFrame]:
    """One repeat: every scheme's search with the repeat's seed, then the refits of what they tried."""
    seed = shared.config.search.seed + repeat
    tables = {
        scheme: search_scheme(
            shared,
            data,
            output,
            scheme_config(shared.config, scheme, seed),
            run_name(scheme, seed),
            echo,
        )
        for scheme in schemes
    }
    for table in tables.values():
        table["repeat"], table["seed"] = repeat, seed
    config = dataclasses.replace(
        shared.config, search=dataclasses.replace(shared.config.search, seed=seed)
    )
    measure_on_test(shared, config, tables, refit_sample, echo)
    return list(tables.values())


def measure_on_test(
    shared: SearchInputs,
    config: SpaceConfig,
    tables: dict[str, pd.DataFrame],
    sample: int | None,
    echo: Echo,
) -> None:
    """Each table's ``config_key``, ``test_accuracy`` and ``refit_seconds`` (its configurations
    refit on ``config``'s pool and tested on its test split), and for cv's table the
    ``ensemble_test_accuracy`` of its pick."""
    for table in tables.values():
        table["config_key"] = [config_key(sampled_values(row)) for _, row in table.iterrows()]
    tests = refit_configurations(shared, config, tables, sample, echo)
    for table in tables.values():
        for column, name in (("test_accuracy", "test_accuracy"), ("refit_seconds", "seconds")):
            table[column] = [
                getattr(tests[k], name) if k in tests else math.nan for k in table["config_key"]
            ]
    if "cv" in tables:
        tables["cv"]["ensemble_test_accuracy"] = pick_ensemble(shared, config, tables["cv"], echo)


def pick_ensemble(
    shared: SearchInputs, config: SpaceConfig, table: pd.DataFrame, echo: Echo
) -> float:
    """The test accuracy of the fold ensemble of the trial the comparison counts as cv's pick
    (:func:`~raytl.compare_figures.selected_index`), so that it stands beside that pick's refit."""
    t, scores, tests = scheme_scores(table, shared.config.search.metric)
    index = selected_index(scores, tests)
    if index is None:
        return math.nan
    row = t.iloc[index]
    if not isinstance(row.get("checkpoint"), str) or not row["checkpoint"]:
        return math.nan
    hp = config.hyperparameters(sampled_values(row))
    location = checkpoint_location(row["checkpoint"], row["storage"])
    echo(f"cv's pick (trial {row['trial_id']}): testing its {int(row['units'])} fold models")
    result: EnsembleResult = ray.get(
        remote_fold_ensemble(config).remote(config, hp, shared.data, location, int(row["units"]))
    )
    return result.test_accuracy


def search_scheme(
    shared: SearchInputs,
    data: ImageData,
    output: Path,
    config: SpaceConfig,
    name: str,
    echo: Echo,
) -> pd.DataFrame:
    """One scheme's search of ``config`` (no refit) in ``output/runs/NAME``, on the shared inputs;
    on a shared ``search.storage`` it stores in its own folder of the comparison's."""
    run_dir = output / "runs" / name
    storage = join_location(shared.storage, name) if shared.config.search.storage else None
    config = dataclasses.replace(config, search=dataclasses.replace(config.search, storage=storage))
    run_dir.mkdir(parents=True, exist_ok=True)
    echo(f"== {name} ==")
    started = time.perf_counter()
    write_space(run_dir, config)
    record_data(config, run_dir, data, resume=False, echo=echo)
    check_resources(config)
    inputs = dataclasses.replace(
        shared, config=config, storage=storage or join_location(run_dir / "ray")
    )
    table = tune_search(inputs, run_dir, resume=False, echo=echo).copy()
    finish_run(config, run_dir, inputs.storage)
    table["search_wall_seconds"] = time.perf_counter() - started
    table["run_dir"], table["storage"] = str(run_dir), inputs.storage
    return table


def refit_configurations(
    shared: SearchInputs,
    config: SpaceConfig,
    tables: dict[str, pd.DataFrame],
    sample: int | None,
    echo: Echo,
) -> dict[str, RefitResult]:
    """Refit each distinct configuration the schemes tried (or a seeded random ``sample`` of them)
    on ``config``'s whole training pool, as parallel Ray tasks; the result per configuration key.

    A probe's refit has no validation split to stop on: it runs the median of the passes the
    schemes' own probes of that configuration kept, so that no one scheme sets it."""
    distinct: dict[str, dict[str, Any]] = {}
    passes: dict[str, list[int]] = {}
    for table in tables.values():
        for _, row in table[table["status"] != "error"].iterrows():
            distinct.setdefault(row["config_key"], sampled_values(row))
            kept = searched_passes(row)
            passes.setdefault(row["config_key"], []).extend([] if kept is None else [kept])
    keys = sorted(distinct)
    seed = config.search.seed
    if sample is not None and sample < len(keys):
        keys = sorted(np.random.default_rng(seed).choice(keys, size=sample, replace=False).tolist())
    echo(f"refitting {len(keys)} configuration(s) on the whole training pool for the test figures")
    refit = remote_refit(config)
    futures = {}
    for key in keys:
        hp = config.hyperparameters(distinct[key])
        median = int(np.median(passes[key])) if passes[key] else None
        futures[key] = refit.remote(
            config, hp, shared.data, shared.features.get(hp.backbone_name), False, median
        )
    return {key: ray.get(future) for key, future in futures.items()}


def machine_description() -> str:
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )


def write_compare(
    output: Path,
    config: SpaceConfig,
    data: Any,
    trials: pd.DataFrame,
    summary: pd.DataFrame,
    seconds: float,
) -> Path:
    """compare.parquet (per scheme and repeat), compare_trials.parquet, plots and compare.md."""
    for name, frame in (("compare.parquet", summary), ("compare_trials.parquet", trials)):
        write_parquet(output / name, frame)
    metric = config.search.metric
    save_figure(plots.scheme_val_vs_test(trials, metric), output / "compare_val_vs_test.png")
    save_figure(plots.scheme_cost_fidelity(summary), output / "compare_cost_fidelity.png")
    agg = aggregate(summary)
    shown = agg[["scheme", "repeats"] + [c for c in agg.columns if c.endswith("_mean")]].copy()
    shown.columns = [c.removesuffix("_mean") for c in shown.columns]
    lines = [
        *_header_lines(config, data, summary, seconds),
        "## Per scheme" + (" (means over repeats)" if (agg["repeats"] > 1).any() else ""),
        "",
        markdown_table(shown),
        "",
        *verdict(agg),
        "",
        "Columns: wall_seconds is the search's elapsed time; worker_seconds sums the training "
        "workers' time; score_std is the mean spread of a trial's score across its units; "
        "kendall_tau/spearman rank the scheme's trials by validation score against their refit "
        f"test accuracy; selected_test_accuracy is the test accuracy of the trial with the best "
        f"{metric}; regret is how far that is below the best test accuracy of any configuration "
        "tried in the same repeat (by any scheme). Test figures come from refitting each "
        "configuration on the whole training pool, for this analysis only; "
        "ensemble_test_accuracy (cv) is the test accuracy of the fold ensemble of the same pick "
        "(its k fold models' averaged softmax, `search.final: fold_ensemble`).",
        "",
    ]
    if (agg["repeats"] > 1).any():
        spread = agg[["scheme"] + [c for c in agg.columns if c.endswith("_std")]]
        lines += ["## Spread over repeats (std)", "", markdown_table(spread), ""]
    lines += [
        "## Per repeat",
        "",
        markdown_table(summary.drop(columns=["oracle_test_accuracy"])),
        "",
        "## Plots",
        "",
        "![validation score vs test accuracy](compare_val_vs_test.png)",
        "",
        "![cost and fidelity](compare_cost_fidelity.png)",
        "",
        "Each scheme's own search (results, report, TensorBoard runs) is under `runs/`.",
    ]
    return atomic_write(output / "compare.md", "\n".join(lines) + "\n")


def _header_lines(
    config: SpaceConfig, data: Any, summary: pd.DataFrame, seconds: float
) -> list[str]:
    s = config.search
    return [
        f"# Evaluation schemes compared: {config.name}",
        "",
        f"Data: {data.source}, {len(data)} images, {len(data.class_names)} classes, "
        f"{config.data.image_size} px, test fraction {config.data.test_fraction} (carved once, "
        f"never seen by a search). Model: {config.model.backbone} ({config.model.pretrained}).",
        f"Budget per scheme: {trials_line(config)}, {s.max_concurrent} at once, up to "
        f"{s.max_epochs} epochs, {s.scheduler} scheduler, {s.sampler} sampler; "
        f"{config.resources.workers_per_trial} worker(s) x {config.resources.cpus_per_worker} CPU "
        f"per trial. Schemes: holdout (val fraction {config.data.val_fraction}), "
        f"cv ({config.scheme.folds} folds), segments ({config.scheme.segments} segments). "
        f"Seeds: {', '.join(str(v) for v in sorted(summary['seed'].unique()))}.",
        f"Machine: {machine_description()}. Whole comparison: {seconds:.0f} s.",
        "",
    ]
