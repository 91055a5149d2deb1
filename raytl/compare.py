"""``raytl compare``: the same search under each evaluation scheme, scored against untouched test data.

Each scheme runs the space with the same seeds and trial budget. Afterwards, for analysis only (the
searches never see it), every distinct configuration a scheme tried is refit on the whole training
pool and tested once. That gives each scheme two kinds of figures:

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raytl.config import SpaceConfig
from raytl.errors import RaytlError

SCHEMES = ("holdout", "cv", "segments")


# ---------------------------------------------------------------------------------------------------
# Figures


def rank_correlations(scores: Sequence[float], tests: Sequence[float]) -> tuple[float, float]:
    """Kendall tau-b and Spearman rho between validation scores and test accuracies.

    NaN when fewer than three pairs remain after dropping missing values, or when either side is
    constant (no ranking to agree with).
    """
    from scipy.stats import kendalltau, spearmanr

    x = np.asarray(scores, dtype=float)
    y = np.asarray(tests, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(kendalltau(x, y).statistic), float(spearmanr(x, y).statistic)


def selection_regret(scores: Sequence[float], tests: Sequence[float], oracle: float) -> tuple[float, float]:
    """The test accuracy of the highest-scoring configuration, and how far it is below ``oracle``.

    Ties on the score go to the earlier entry (the order the search would have reported them).
    """
    x = np.asarray(scores, dtype=float)
    y = np.asarray(tests, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    if not keep.any():
        return math.nan, math.nan
    index = np.flatnonzero(keep)[int(np.argmax(x[keep]))]
    return float(y[index]), float(oracle - y[index])


def config_key(sampled: dict[str, Any]) -> str:
    """A stable key for one configuration, so schemes that tried the same one share its refit."""
    return json.dumps({k: sampled[k] for k in sorted(sampled)}, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------------
# Running


def run_name(scheme: str, seed: int) -> str:
    return f"{scheme}_seed{seed}"


def scheme_config(config: SpaceConfig, scheme: str, seed: int) -> SpaceConfig:
    """The space with another scheme and search seed; everything else (data, test split) unchanged.

    On a shared ``search.storage`` each run gets its own sub-folder, so the runs never collide.
    """
    storage = config.search.storage
    if storage:
        storage = f"{storage.rstrip('/')}/{run_name(scheme, seed)}"
    return dataclasses.replace(
        config,
        scheme=dataclasses.replace(config.scheme, kind=scheme),
        search=dataclasses.replace(config.search, seed=seed, storage=storage),
    )


def parse_schemes(text: str) -> list[str]:
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    wrong = [s for s in schemes if s not in SCHEMES]
    if wrong or not schemes:
        named = ", ".join(wrong) if wrong else repr(text)
        raise RaytlError(f"--schemes: {named} is not a scheme; "
                         f"expected a comma-separated list of {', '.join(SCHEMES)}")
    if len(set(schemes)) != len(schemes):
        raise RaytlError(f"--schemes: {text!r} names a scheme twice")
    return schemes


def run_compare(
    config: SpaceConfig, output: Path, *, schemes: Sequence[str] = SCHEMES, repeats: int = 1,
    refit_sample: int | None = None, address: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Run the space once per scheme and repeat, refit the configurations, write the comparison."""
    import ray

    from raytl.search import echo_line, init_ray, prepare_feature_cache, run_search
    from raytl.train import load_dataset, write_skipped, write_space

    echo = echo or echo_line
    if repeats < 1:
        raise RaytlError(f"--repeats: expected 1 or more, got {repeats}")
    started = time.perf_counter()
    output = Path(output).resolve()
    write_space(output, config)
    data = load_dataset(config)
    write_skipped(output, data)
    owns_ray = init_ray(address)
    trials: list[pd.DataFrame] = []
    try:
        data_ref = [ray.put(data)]
        storage = config.search.storage or str(output)
        feature_refs = prepare_feature_cache(config, data_ref, storage, echo)
        for repeat in range(repeats):
            seed = config.search.seed + repeat
            tables = {}
            for scheme in schemes:
                run_dir = output / "runs" / run_name(scheme, seed)
                run_dir.mkdir(parents=True, exist_ok=True)
                echo(f"== {scheme}, seed {seed} ==")
                t0 = time.perf_counter()
                table = run_search(scheme_config(config, scheme, seed), run_dir, data=data,
                                   data_ref=data_ref, refit=False, echo=echo,
                                   feature_refs=feature_refs)
                table = table.copy()
                table["search_wall_seconds"] = time.perf_counter() - t0
                table["repeat"], table["seed"], table["run_dir"] = repeat, seed, str(run_dir)
                tables[scheme] = table
            tests = refit_configurations(config, tables, seed, data_ref, refit_sample, echo,
                                         feature_refs)
            for table in tables.values():
                table["config_key"] = [config_key(_sampled(row)) for _, row in table.iterrows()]
                for column, field in (("test_accuracy", "test_accuracy"), ("refit_seconds", "seconds")):
                    table[column] = [tests.get(k, {}).get(field, math.nan) for k in table["config_key"]]
                trials.append(table)
    finally:
        if owns_ray:
            ray.shutdown()
    trial_table = pd.concat(trials, ignore_index=True)
    summary = summarize(trial_table, config.search.metric)
    write_compare(output, config, data, trial_table, summary, time.perf_counter() - started)
    echo(f"comparison written to {output / 'compare.md'}")
    return summary


def _sampled(row: pd.Series) -> dict[str, Any]:
    from raytl.search import sampled_values

    return sampled_values(row)


def refit_configurations(
    config: SpaceConfig, tables: dict[str, pd.DataFrame], seed: int, data_ref: list[Any],
    sample: int | None, echo: Callable[[str], None], feature_refs: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Refit each distinct configuration the schemes tried (or a seeded random ``sample`` of them)
    on the whole training pool, as parallel Ray tasks; test accuracy per configuration key."""
    import ray

    from raytl.search import _refit

    distinct: dict[str, dict[str, Any]] = {}
    for table in tables.values():
        for _, row in table[table["status"] != "error"].iterrows():
            sampled = _sampled(row)
            distinct.setdefault(config_key(sampled), sampled)
    keys = sorted(distinct)
    if sample is not None and sample < len(keys):
        keys = sorted(np.random.default_rng(seed).choice(keys, size=sample, replace=False).tolist())
    echo(f"refitting {len(keys)} configuration(s) on the whole training pool for the test figures")
    r = config.resources
    remote = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(_refit)
    refit_space = dataclasses.replace(config, search=dataclasses.replace(config.search, seed=seed))
    futures = {k: remote.remote(refit_space.to_dict(), config.source, distinct[k], data_ref, False,
                                feature_refs)
               for k in keys}
    results = {}
    for key, future in futures.items():
        result = ray.get(future)
        results[key] = {"test_accuracy": result["test_accuracy"], "seconds": result["seconds"]}
    return results


def summarize(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (repeat, scheme): cost and fidelity figures."""
    rows = []
    score_col = f"{metric}_mean"
    sign = -1.0 if metric.endswith("loss") else 1.0  # higher is better for every score used below
    for repeat, in_repeat in trials.groupby("repeat", sort=True):
        oracle = float(in_repeat["test_accuracy"].max())
        for scheme, t in in_repeat.groupby("scheme", sort=False):
            t = t.sort_values("trial_id")
            scores = sign * t[score_col].to_numpy(dtype=float)
            tests = t["test_accuracy"].to_numpy(dtype=float)
            tau, rho = rank_correlations(scores, tests)
            chosen, regret = selection_regret(scores, tests, oracle)
            rows.append({
                "repeat": int(repeat), "seed": int(t["seed"].iloc[0]), "scheme": scheme,
                "trials": len(t), "completed": int((t["status"] == "completed").sum()),
                "stopped": int((t["status"] == "stopped").sum()),
                "errors": int((t["status"] == "error").sum()),
                "epochs": int(t["epochs"].sum()),
                "wall_seconds": float(t["search_wall_seconds"].iloc[0]),
                "worker_seconds": float(t["worker_seconds"].sum()),
                "units": int(t["units"].max()) if t["units"].notna().any() else 0,
                "score_std": float(t[f"{metric}_std"].mean()),
                "kendall_tau": tau, "spearman": rho,
                "selected_test_accuracy": chosen, "oracle_test_accuracy": oracle, "regret": regret,
                "refit": int(t["test_accuracy"].notna().sum()),
            })
    return pd.DataFrame(rows)


FIGURES = ("wall_seconds", "worker_seconds", "completed", "epochs", "score_std", "kendall_tau",
           "spearman", "selected_test_accuracy", "regret")


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread (std over repeats) of each figure per scheme, in the order they ran."""
    order = list(dict.fromkeys(summary["scheme"]))
    grouped = summary.groupby("scheme")[list(FIGURES)]
    mean, std = grouped.mean().loc[order], grouped.std(ddof=1).loc[order]
    out = mean.add_suffix("_mean").join(std.add_suffix("_std"))
    out.insert(0, "repeats", summary.groupby("scheme").size().loc[order])
    return out.reset_index()


def verdict(agg: pd.DataFrame) -> list[str]:
    """Which scheme won on what, in plain sentences."""
    lines = []
    by = agg.set_index("scheme")
    cheapest = by["worker_seconds_mean"].idxmin()
    dearest = by["worker_seconds_mean"].idxmax()
    ratio = by.loc[dearest, "worker_seconds_mean"] / max(by.loc[cheapest, "worker_seconds_mean"], 1e-9)
    lines.append(f"**Cost:** {cheapest} was the cheapest ({by.loc[cheapest, 'worker_seconds_mean']:.0f} "
                 f"worker-seconds); {dearest} cost {ratio:.1f}x as much.")
    if by["kendall_tau_mean"].notna().any():
        best_rank = by["kendall_tau_mean"].idxmax()
        lines.append(f"**Ranking:** {best_rank}'s validation scores agreed best with test accuracy "
                     f"(Kendall tau {by.loc[best_rank, 'kendall_tau_mean']:.2f}; "
                     + ", ".join(f"{s} {v:.2f}" for s, v in by["kendall_tau_mean"].items()
                                 if s != best_rank and not math.isnan(v)) + ").")
    else:
        lines.append("**Ranking:** too few refit trials per scheme for a rank correlation.")
    if by["regret_mean"].notna().any():
        low = by["regret_mean"].min()
        winners = [s for s, v in by["regret_mean"].items() if abs(v - low) < 1e-9]
        others = [f"{s} {v:.4f}" for s, v in by["regret_mean"].items() if s not in winners]
        if others:
            lines.append(f"**Selection:** {', '.join(winners)} picked the configuration closest to "
                         f"the best test accuracy found (regret {low:.4f}; {', '.join(others)}).")
        else:
            lines.append(f"**Selection:** every scheme picked a configuration with the same test "
                         f"accuracy (regret {low:.4f} for all).")
        if cheapest in winners:
            lines.append(f"**Verdict:** for this budget {cheapest} chose as well as any scheme at the "
                         f"lowest cost.")
        else:
            best = min(winners, key=lambda s: by.loc[s, "worker_seconds_mean"])
            gain = by.loc[cheapest, "regret_mean"] - by.loc[best, "regret_mean"]
            extra = by.loc[best, "worker_seconds_mean"] / max(by.loc[cheapest, "worker_seconds_mean"], 1e-9)
            lines.append(f"**Verdict:** {best}'s {extra:.1f}x cost bought {gain:.4f} test accuracy over "
                         f"{cheapest}'s pick.")
    if (agg["repeats"] > 1).any():
        lines.append("Figures are means over repeats; see the std columns for how much they move.")
    else:
        lines.append("One repeat: differences of a trial or two are within noise; use --repeats to "
                     "see the spread.")
    return lines


# ---------------------------------------------------------------------------------------------------
# Writing


def machine_description() -> str:
    import torch

    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")


def write_compare(output: Path, config: SpaceConfig, data: Any, trials: pd.DataFrame,
                  summary: pd.DataFrame, seconds: float) -> Path:
    """compare.parquet (per scheme and repeat), compare_trials.parquet, plots and compare.md."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytl import plots
    from raytl.report import _markdown_table, _save

    for name, frame in (("compare.parquet", summary), ("compare_trials.parquet", trials)):
        tmp = output / f".{name}.tmp"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        tmp.replace(output / name)
    metric = config.search.metric
    _save(plots.scheme_val_vs_test(trials, metric), output / "compare_val_vs_test.png")
    _save(plots.scheme_cost_fidelity(summary), output / "compare_cost_fidelity.png")
    agg = aggregate(summary)
    shown = agg[["scheme", "repeats"] + [c for c in agg.columns if c.endswith("_mean")]].copy()
    shown.columns = [c.removesuffix("_mean") for c in shown.columns]
    s = config.search
    lines = [
        f"# Evaluation schemes compared: {config.name}", "",
        f"Data: {data.source}, {len(data)} images, {len(data.class_names)} classes, "
        f"{config.data.image_size} px, test fraction {config.data.test_fraction} (carved once, "
        f"never seen by a search). Model: {config.model.backbone} ({config.model.pretrained}).",
        f"Budget per scheme: {s.num_samples} trials, {s.max_concurrent} at once, up to "
        f"{s.max_epochs} epochs, {s.scheduler} scheduler, {s.sampler} sampler; "
        f"{config.resources.workers_per_trial} worker(s) x {config.resources.cpus_per_worker} CPU "
        f"per trial. Schemes: holdout (val fraction {config.data.val_fraction}), "
        f"cv ({config.scheme.folds} folds), segments ({config.scheme.segments} segments). "
        f"Seeds: {', '.join(str(v) for v in sorted(summary['seed'].unique()))}.",
        f"Machine: {machine_description()}. Whole comparison: {seconds:.0f} s.", "",
        "## Per scheme" + (" (means over repeats)" if (agg["repeats"] > 1).any() else ""), "",
        _markdown_table(shown), "",
        *verdict(agg), "",
        "Columns: wall_seconds is the search's elapsed time; worker_seconds sums the training "
        "workers' time; score_std is the mean spread of a trial's score across its units; "
        "kendall_tau/spearman rank the scheme's trials by validation score against their refit "
        f"test accuracy; selected_test_accuracy is the test accuracy of the trial with the best "
        f"{metric}; regret is how far that is below the best test accuracy of any configuration "
        "tried in the same repeat (by any scheme). Test figures come from refitting each "
        "configuration on the whole training pool, for this analysis only.", "",
    ]
    if (agg["repeats"] > 1).any():
        spread = agg[["scheme"] + [c for c in agg.columns if c.endswith("_std")]]
        lines += ["## Spread over repeats (std)", "", _markdown_table(spread), ""]
    lines += ["## Per repeat", "", _markdown_table(summary.drop(columns=["oracle_test_accuracy"])), "",
              "## Plots", "",
              "![validation score vs test accuracy](compare_val_vs_test.png)", "",
              "![cost and fidelity](compare_cost_fidelity.png)", "",
              "Each scheme's own search (results, report, TensorBoard runs) is under `runs/`."]
    path = output / "compare.md"
    tmp = output / ".compare.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
