"""The figures of the paired fidelity study (:mod:`raytl.paired`), pure functions of its trials.

Every scheme scored the same K configurations, so its rank correlation with test accuracy is
measured on the same set as every other scheme's, and so are the intervals: a bootstrap resamples
configurations (the same draw for every scheme: a paired bootstrap), within each repeat, and
averages over repeats. A rule is stated only as far as those intervals carry it
(:func:`rule_lines`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, spearmanr

from raytl.compare_figures import rank_correlations, scheme_scores, selection_regret

BOOTSTRAP = 2000
REFERENCE = "cv"  # what the other schemes' correlations are measured against


def paired_summary(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (pool size, repeat, scheme): its rank correlations over the K configurations,
    its pick's test accuracy and regret against the best of the K, its cost and its spread."""
    rows = []
    for (pool, repeat), cell in trials.groupby(["pool_size", "repeat"], sort=True):
        oracle = float(cell["test_accuracy"].max())  # the refits are shared: the best of the K
        for scheme, t in cell.groupby("scheme", sort=False):
            t, scores, tests = scheme_scores(t, metric)
            tau, rho = rank_correlations(scores, tests)
            chosen, regret = selection_regret(scores, tests, oracle)
            rows.append(
                {
                    "pool_size": int(pool),  # type: ignore[call-overload]
                    "repeat": int(repeat),  # type: ignore[call-overload]
                    "scheme": scheme,
                    "configurations": len(t),
                    "kendall_tau": tau,
                    "spearman": rho,
                    "selected_test_accuracy": chosen,
                    "best_test_accuracy": oracle,
                    "regret": regret,
                    "worker_seconds": float(t["worker_seconds"].sum()),
                    "wall_seconds": float(t["search_wall_seconds"].iloc[0]),
                    "score_std": float(t[f"{metric}_std"].mean()),
                    "ensemble_test_accuracy": (
                        float(t["ensemble_test_accuracy"].iloc[0])
                        if "ensemble_test_accuracy" in t
                        else math.nan
                    ),
                }
            )
    return pd.DataFrame(rows)


def _aligned(cell: pd.DataFrame, schemes: list[str], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, tests) of one repeat: scores[s, i] is scheme s's oriented score of configuration
    i, tests[i] its refit test accuracy; configurations in ``config_key`` order."""
    keys = sorted(cell["config_key"].unique())
    position = {k: i for i, k in enumerate(keys)}
    scores = np.full((len(schemes), len(keys)), np.nan)
    tests = np.full(len(keys), np.nan)
    for s, scheme in enumerate(schemes):
        t, oriented, test = scheme_scores(cell[cell["scheme"] == scheme], metric)
        for key, score, value in zip(t["config_key"], oriented, test, strict=True):
            scores[s, position[key]] = score
            tests[position[key]] = value
    return scores, tests


def _correlations(scores: np.ndarray, tests: np.ndarray) -> np.ndarray:
    """[scheme, (tau, rho)] on one (resampled) set of configurations; NaN where undefined."""
    out = np.full((len(scores), 2), np.nan)
    for s, row in enumerate(scores):
        keep = ~(np.isnan(row) | np.isnan(tests))
        x, y = row[keep], tests[keep]
        if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            out[s] = kendalltau(x, y).statistic, spearmanr(x, y).statistic
    return out


def bootstrap_intervals(
    trials: pd.DataFrame, metric: str, draws: int = BOOTSTRAP, seed: int = 0
) -> pd.DataFrame:
    """Per pool size and scheme: Kendall tau-b and Spearman (mean over repeats) with percentile
    95% intervals from a paired bootstrap over configurations, and the same for the difference
    to :data:`REFERENCE` (cv) where it ran."""
    rng = np.random.default_rng(seed)
    rows = []
    for pool, by_pool in trials.groupby("pool_size", sort=True):
        schemes = list(dict.fromkeys(by_pool["scheme"]))
        cells = [_aligned(c, schemes, metric) for _, c in by_pool.groupby("repeat", sort=True)]
        with warnings.catch_warnings():  # a correlation undefined in every repeat stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            point = np.nanmean([_correlations(s, t) for s, t in cells], axis=0)
        samples = np.empty((draws, len(schemes), 2))
        for b in range(draws):
            picks = [rng.integers(0, len(t), len(t)) for _, t in cells]
            per_repeat = [
                _correlations(s[:, i], t[i]) for (s, t), i in zip(cells, picks, strict=True)
            ]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                samples[b] = np.nanmean(per_repeat, axis=0)
        ref = schemes.index(REFERENCE) if REFERENCE in schemes else None
        for s, scheme in enumerate(schemes):
            row: dict[str, object] = {"pool_size": int(pool), "scheme": scheme}  # type: ignore[arg-type]
            row["repeats"], row["configurations"] = len(cells), len(cells[0][1])
            for j, name in enumerate(("kendall_tau", "spearman")):
                row[name] = float(point[s, j])
                row[f"{name}_low"], row[f"{name}_high"] = _interval(samples[:, s, j])
                if ref is not None and s != ref:
                    diff = samples[:, s, j] - samples[:, ref, j]
                    row[f"{name}_minus_{REFERENCE}"] = float(point[s, j] - point[ref, j])
                    low, high = _interval(diff)
                    row[f"{name}_minus_{REFERENCE}_low"] = low
                    row[f"{name}_minus_{REFERENCE}_high"] = high
            rows.append(row)
    return pd.DataFrame(rows)


def _interval(values: np.ndarray) -> tuple[float, float]:
    kept = values[~np.isnan(values)]
    if not len(kept):
        return math.nan, math.nan
    low, high = np.percentile(kept, [2.5, 97.5])
    return float(low), float(high)


def rule_lines(intervals: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """What the study supports, per pool size and scheme against cv: a difference in Kendall
    tau only where its 95% interval excludes zero, otherwise the interval itself, with the
    scheme's cost as a share of cv's worker-seconds."""
    if f"kendall_tau_minus_{REFERENCE}" not in intervals:
        return [f"No rule: the study did not run {REFERENCE}, the reference scheme."]
    cost = summary.groupby(["pool_size", "scheme"])["worker_seconds"].mean()
    lines = []
    for _, row in intervals[intervals["scheme"] != REFERENCE].iterrows():
        pool, scheme = int(row["pool_size"]), row["scheme"]
        share = cost[(pool, scheme)] / max(cost[(pool, REFERENCE)], 1e-9)
        d = row[f"kendall_tau_minus_{REFERENCE}"]
        low = row[f"kendall_tau_minus_{REFERENCE}_low"]
        high = row[f"kendall_tau_minus_{REFERENCE}_high"]
        where = f"At pool size {pool:,} ({int(row['configurations'])} configurations x "
        where += f"{int(row['repeats'])} repeat(s))"
        if math.isnan(low):
            lines.append(
                f"{where}: no estimate for {scheme} against {REFERENCE} (fewer than three "
                "configurations with distinct scores and test accuracies)."
            )
        elif low > 0 or high < 0:
            side = "above" if low > 0 else "below"
            lines.append(
                f"{where}: {scheme}'s Kendall tau is {side} {REFERENCE}'s by {abs(d):.2f} "
                f"(95% interval of the difference {low:+.2f} to {high:+.2f}), at {share:.0%} of "
                f"its worker-seconds."
            )
        else:
            lines.append(
                f"{where}: no difference in Kendall tau between {scheme} and {REFERENCE} is "
                f"detectable ({scheme} − {REFERENCE} {d:+.2f}, 95% interval {low:+.2f} to "
                f"{high:+.2f}: {scheme}'s tau is within {max(-low, high):.2f} of "
                f"{REFERENCE}'s), at {share:.0%} of its worker-seconds."
            )
    return lines
