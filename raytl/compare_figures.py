"""The figures of a scheme comparison: how well each scheme's validation scores rank
configurations by test accuracy (Kendall tau-b, Spearman), the regret of its pick, its cost, and a
verdict in plain sentences. Pure functions of the trial tables, tested on known inputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.stats import kendalltau, spearmanr

from raytl.config import metric_mode


def rank_correlations(scores: ArrayLike, tests: ArrayLike) -> tuple[float, float]:
    """Kendall tau-b and Spearman rho between validation scores and test accuracies.

    NaN when fewer than three pairs remain after dropping missing values, or when either side is
    constant (no ranking to agree with).
    """
    x = np.asarray(scores, dtype=float)
    y = np.asarray(tests, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(kendalltau(x, y).statistic), float(spearmanr(x, y).statistic)


def selected_index(scores: ArrayLike, tests: ArrayLike) -> int | None:
    """The position of the highest-scoring configuration among those with a test figure (None:
    none has both). Ties on the score go to the earlier entry (the order the search reported)."""
    x = np.asarray(scores, dtype=float)
    y = np.asarray(tests, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    if not keep.any():
        return None
    return int(np.flatnonzero(keep)[int(np.argmax(x[keep]))])


def selection_regret(scores: ArrayLike, tests: ArrayLike, oracle: float) -> tuple[float, float]:
    """The test accuracy of the highest-scoring configuration (:func:`selected_index`), and how
    far it is below ``oracle``."""
    index = selected_index(scores, tests)
    if index is None:
        return math.nan, math.nan
    chosen = float(np.asarray(tests, dtype=float)[index])
    return chosen, float(oracle - chosen)


def scheme_scores(t: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A scheme's trials in the order it reported them, their scores oriented so that higher is
    better, and their refit test accuracies."""
    sign = -1.0 if metric_mode(metric) == "min" else 1.0
    t = t.sort_values("trial_id")
    return t, sign * t[f"{metric}_mean"].to_numpy(dtype=float), t["test_accuracy"].to_numpy(float)


def summarize(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (repeat, scheme): cost and fidelity figures."""
    rows = []
    for repeat in sorted(trials["repeat"].unique()):
        in_repeat = trials[trials["repeat"] == repeat]
        oracle = float(in_repeat["test_accuracy"].max())
        for scheme, t in in_repeat.groupby("scheme", sort=False):
            t, scores, tests = scheme_scores(t, metric)
            tau, rho = rank_correlations(scores, tests)
            chosen, regret = selection_regret(scores, tests, oracle)
            rows.append(
                {
                    "repeat": int(repeat),
                    "seed": int(t["seed"].to_numpy()[0]),
                    "scheme": scheme,
                    "trials": len(t),
                    "completed": int((t["status"] == "completed").sum()),
                    "stopped": int((t["status"] == "stopped").sum()),
                    "errors": int((t["status"] == "error").sum()),
                    "epochs": int(t["epochs"].sum()),
                    "wall_seconds": float(t["search_wall_seconds"].iloc[0]),
                    "worker_seconds": float(t["worker_seconds"].sum()),
                    "units": int(t["units"].max()) if t["units"].notna().any() else 0,
                    "score_std": float(t[f"{metric}_std"].mean()),
                    "kendall_tau": tau,
                    "spearman": rho,
                    "selected_test_accuracy": chosen,
                    "oracle_test_accuracy": oracle,
                    "regret": regret,
                    # cv: the fold ensemble of the same pick, tested on the same split
                    "ensemble_test_accuracy": (
                        float(t["ensemble_test_accuracy"].iloc[0])
                        if "ensemble_test_accuracy" in t
                        else math.nan
                    ),
                    "refit": int(t["test_accuracy"].notna().sum()),
                }
            )
    return pd.DataFrame(rows)


FIGURES = (
    "wall_seconds",
    "worker_seconds",
    "completed",
    "epochs",
    "score_std",
    "kendall_tau",
    "spearman",
    "selected_test_accuracy",
    "regret",
    "ensemble_test_accuracy",
)


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
    ratio = by.loc[dearest, "worker_seconds_mean"] / max(
        by.loc[cheapest, "worker_seconds_mean"], 1e-9
    )
    lines.append(
        f"**Cost:** {cheapest} was the cheapest ({by.loc[cheapest, 'worker_seconds_mean']:.0f} "
        f"worker-seconds); {dearest} cost {ratio:.1f}x as much."
    )
    if by["kendall_tau_mean"].notna().any():
        best_rank = by["kendall_tau_mean"].idxmax()
        lines.append(
            f"**Ranking:** {best_rank}'s validation scores agreed best with test accuracy "
            f"(Kendall tau {by.loc[best_rank, 'kendall_tau_mean']:.2f}; "
            + ", ".join(
                f"{s} {v:.2f}"
                for s, v in by["kendall_tau_mean"].items()
                if s != best_rank and not math.isnan(v)
            )
            + ")."
        )
    else:
        lines.append("**Ranking:** too few refit trials per scheme for a rank correlation.")
    if by["regret_mean"].notna().any():
        lines += _selection_lines(by, cheapest)
    lines += _final_model_lines(by)
    if (agg["repeats"] > 1).any():
        lines.append("Figures are means over repeats; see the std columns for how much they move.")
    else:
        lines.append(
            "One repeat: differences of a trial or two are within noise; use --repeats to "
            "see the spread."
        )
    return lines


def _selection_lines(by: pd.DataFrame, cheapest: Any) -> list[str]:
    """Which schemes picked closest to the best test accuracy, and what the extra cost bought."""
    lines = []
    low = by["regret_mean"].min()
    winners: list[Any] = [s for s, v in by["regret_mean"].items() if abs(v - low) < 1e-9]
    others = [f"{s} {v:.4f}" for s, v in by["regret_mean"].items() if s not in winners]
    if others:
        lines.append(
            f"**Selection:** {', '.join(map(str, winners))} picked the configuration closest to "
            f"the best test accuracy found (regret {low:.4f}; {', '.join(others)})."
        )
    else:
        lines.append(
            f"**Selection:** every scheme picked a configuration with the same test "
            f"accuracy (regret {low:.4f} for all)."
        )
    if cheapest in winners:
        lines.append(
            f"**Verdict:** for this budget {cheapest} chose as well as any scheme at the "
            f"lowest cost."
        )
    else:
        best = min(winners, key=lambda s: by.loc[s, "worker_seconds_mean"])
        gain = by.loc[cheapest, "regret_mean"] - by.loc[best, "regret_mean"]
        extra = by.loc[best, "worker_seconds_mean"] / max(
            by.loc[cheapest, "worker_seconds_mean"], 1e-9
        )
        lines.append(
            f"**Verdict:** {best}'s {extra:.1f}x cost bought {gain:.4f} test accuracy over "
            f"{cheapest}'s pick."
        )
    return lines


def _final_model_lines(by: pd.DataFrame) -> list[str]:
    """The refit of a scheme's pick against the fold ensemble of the same pick (cv only)."""
    lines = []
    for scheme, row in by.iterrows():
        ensemble, refit = row["ensemble_test_accuracy_mean"], row["selected_test_accuracy_mean"]
        if math.isnan(ensemble) or math.isnan(refit):
            continue
        better = "above" if ensemble > refit else "below" if ensemble < refit else "level with"
        lines.append(
            f"**Final model ({scheme}):** the fold ensemble of its pick tested {ensemble:.4f}, "
            f"{better} the refit of the same configuration on the whole pool ({refit:.4f})."
        )
    return lines
