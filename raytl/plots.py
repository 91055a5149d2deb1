"""The report's figures (matplotlib, headless): one function per plot, each returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: figures only go to PNG files and TensorBoard

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from raytl.strategies import STRATEGIES  # noqa: E402

# one colour per registered strategy, in registry order (matplotlib's tab10 cycle)
STRATEGY_COLOURS = dict(
    zip(
        STRATEGIES,
        [
            f"tab:{c}"
            for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "olive", "cyan")
        ],
        strict=False,
    )
)


def _colour(strategy: str) -> str:
    return STRATEGY_COLOURS.get(strategy, "tab:gray")


def metric_per_trial(results: pd.DataFrame, metric: str, maximise: bool) -> Figure:
    """Each trial's score in the order the trials started, with the running best."""
    fig, ax = plt.subplots(figsize=(7, 4))
    values = results[f"{metric}_mean"].to_numpy(dtype=float)
    order = np.arange(1, len(values) + 1)
    ax.scatter(order, values, c=[_colour(s) for s in results["strategy"]], zorder=3)
    filled = np.where(np.isnan(values), -np.inf if maximise else np.inf, values)
    running = np.maximum.accumulate(filled) if maximise else np.minimum.accumulate(filled)
    ax.step(
        order,
        np.where(np.isfinite(running), running, np.nan),
        where="post",
        color="black",
        label="running best",
    )
    ax.set(xlabel="trial (in start order)", ylabel=metric, title=f"{metric} per trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _strategy_legend(ax, extra=True)
    fig.tight_layout()
    return fig


def metric_by_strategy(results: pd.DataFrame, metric: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    strategies = [s for s in STRATEGY_COLOURS if s in set(results["strategy"])]
    strategies += sorted(set(results["strategy"]) - set(strategies))
    for i, strategy in enumerate(strategies):
        values = results.loc[results["strategy"] == strategy, f"{metric}_mean"].dropna()
        jitter = np.random.default_rng(i).uniform(-0.12, 0.12, len(values))
        ax.scatter(np.full(len(values), i) + jitter, values, color=_colour(strategy), zorder=3)
        if len(values):
            ax.hlines(values.max(), i - 0.3, i + 0.3, color=_colour(strategy))
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set(ylabel=metric, title=f"{metric} by strategy (line: best)")
    fig.tight_layout()
    return fig


def metric_vs_freeze_depth(results: pd.DataFrame, metric: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    shown = (
        results.dropna(subset=["freeze_depth"]) if "freeze_depth" in results else results.iloc[:0]
    )
    for strategy, group in shown.groupby("strategy"):
        ax.scatter(
            group["freeze_depth"],
            group[f"{metric}_mean"],
            color=_colour(strategy),
            label=strategy,
            zorder=3,
        )
    if not len(shown):
        ax.text(0.5, 0.5, "no trial used freeze_depth", ha="center", transform=ax.transAxes)
    else:
        ax.legend()
    ax.set(
        xlabel="freeze_depth (blocks frozen, stem first)",
        ylabel=metric,
        title=f"{metric} vs freeze depth",
    )
    fig.tight_layout()
    return fig


def learning_curves(
    history: pd.DataFrame, results: pd.DataFrame, metric: str, maximise: bool, top: int = 5
) -> Figure:
    """The validation curves (mean over units) of the best ``top`` trials."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ranked = results.sort_values(f"{metric}_mean", ascending=not maximise).head(top)
    styles = ["-", "--", ":", "-.", (0, (5, 1))]  # trials of one strategy share a colour
    if metric not in history:  # a history written before raytl recorded this metric
        history = history.assign(**{metric: np.nan})
    for rank, (_, row) in enumerate(ranked.iterrows()):
        curve = history[history["trial_id"] == row["trial_id"]].sort_values("epoch")
        ax.plot(
            curve["epoch"],
            curve[metric],
            marker="o",
            color=_colour(row["strategy"]),
            linestyle=styles[rank % len(styles)],
            label=f"{row['trial_id']} ({row['strategy']})",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="epoch", ylabel=f"{metric} (mean over units)", title=f"learning curves, top {top}"
    )
    if len(ranked):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(labels: list[int], predictions: list[int], class_names: list[str]) -> Figure:
    """The test confusion matrix (scikit-learn's ``ConfusionMatrixDisplay``), accuracy in the title."""
    n = len(class_names)
    size = max(4.0, min(12.0, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    display = ConfusionMatrixDisplay.from_predictions(
        labels,
        predictions,
        labels=list(range(n)),
        display_labels=class_names,
        ax=ax,
        cmap="Blues",
        colorbar=False,
        xticks_rotation=45,
    )
    matrix = display.confusion_matrix
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    ax.set(
        xlabel="predicted", ylabel="true", title=f"test confusion matrix (accuracy {accuracy:.3f})"
    )
    fig.tight_layout()
    return fig


def _strategy_legend(ax: plt.Axes, extra: bool | str = False, star: bool = False) -> None:
    """The strategies' colours; ``extra``: the black line's label ("running best" for True)."""
    handles = [
        Line2D([], [], marker="o", linestyle="", color=c, label=s)
        for s, c in STRATEGY_COLOURS.items()
    ]
    if extra:
        label = extra if isinstance(extra, str) else "running best"
        handles.append(Line2D([], [], color="black", label=label))
    if star:
        handles.append(
            Line2D([], [], marker="*", markersize=12, linestyle="", color="black", label="the pick")
        )
    ax.legend(handles=handles, fontsize=8)


SCHEME_COLOURS = {"holdout": "tab:purple", "cv": "tab:blue", "segments": "tab:olive"}


def scheme_val_vs_test(trials: pd.DataFrame, metric: str) -> Figure:
    """Per scheme: each trial's validation score against its configuration's refit test accuracy."""
    schemes = list(dict.fromkeys(trials["scheme"]))
    fig, axes = plt.subplots(
        1, len(schemes), figsize=(4 * len(schemes), 3.8), squeeze=False, sharey=True
    )
    for ax, scheme in zip(axes[0], schemes, strict=True):
        t = trials[trials["scheme"] == scheme]
        ax.scatter(
            t[f"{metric}_mean"], t["test_accuracy"], c=[_colour(s) for s in t["strategy"]], zorder=3
        )
        ax.set(title=scheme, xlabel=f"validation {metric} (the scheme's score)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (refit on the whole pool)")
    _strategy_legend(axes[0][-1])
    fig.tight_layout()
    return fig


def scheme_cost_fidelity(summary: pd.DataFrame) -> Figure:
    """Bars per scheme: worker-seconds, Kendall tau and regret (mean over repeats, std as error)."""
    grouped = summary.groupby("scheme", sort=False)
    mean, std = grouped.mean(numeric_only=True), grouped.std(ddof=1, numeric_only=True).fillna(0)
    figures = [
        ("worker_seconds", "worker-seconds (cost)"),
        ("kendall_tau", "Kendall tau (ranking)"),
        ("regret", "regret of the pick (test acc.)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, (column, title) in zip(axes, figures, strict=True):
        colours = [SCHEME_COLOURS.get(s, "tab:gray") for s in mean.index]
        ax.bar(mean.index, mean[column].fillna(0), yerr=std[column], color=colours, capsize=4)
        ax.set(title=title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def paired_tau(intervals: pd.DataFrame) -> Figure:
    """Kendall tau per scheme and pool size, with its 95% bootstrap interval as the error bar."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    pools = sorted(intervals["pool_size"].unique())
    schemes = list(dict.fromkeys(intervals["scheme"]))
    width = 0.8 / max(len(schemes), 1)
    for s, scheme in enumerate(schemes):
        t = intervals[intervals["scheme"] == scheme].set_index("pool_size").reindex(pools)
        x = np.arange(len(pools)) + (s - (len(schemes) - 1) / 2) * width
        low = (t["kendall_tau"] - t["kendall_tau_low"]).clip(lower=0).fillna(0)
        high = (t["kendall_tau_high"] - t["kendall_tau"]).clip(lower=0).fillna(0)
        colour = SCHEME_COLOURS.get(scheme.split("_")[0], "tab:gray")
        ax.errorbar(
            x, t["kendall_tau"], yerr=[low, high], fmt="o", capsize=4, color=colour, label=scheme
        )
    ax.set_xticks(np.arange(len(pools)), [f"{int(p):,}" for p in pools])
    ax.set(xlabel="pool size (images)", ylabel="Kendall tau (val score vs test)")
    ax.axhline(0, color="black", lw=0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def paired_cost_regret(summary: pd.DataFrame) -> Figure:
    """Each scheme's regret of its pick against its worker-seconds (mean over repeats), one point
    per pool size: the cost-fidelity frontier."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    mean = summary.groupby(["scheme", "pool_size"], sort=False)[["worker_seconds", "regret"]].mean()
    for scheme, t in mean.reset_index().groupby("scheme", sort=False):
        colour = SCHEME_COLOURS.get(str(scheme).split("_")[0], "tab:gray")
        ax.plot(t["worker_seconds"], t["regret"], "o-", color=colour, label=str(scheme))
        for _, row in t.iterrows():
            ax.annotate(
                f"{int(row['pool_size']):,}",
                (row["worker_seconds"], row["regret"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set(xlabel="worker-seconds (cost)", ylabel="regret of the pick (test accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def metric_vs_latency(
    results: pd.DataFrame, metric: str, maximise: bool, pick: str | None
) -> Figure:
    """Each trial's score against its model's batch-1 latency, the front of best trade-offs
    (no faster model scores better) and the pick (a star)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = results.dropna(subset=[f"{metric}_mean", "latency_ms_batch1"])
    x, y = ok["latency_ms_batch1"].to_numpy(float), ok[f"{metric}_mean"].to_numpy(float)
    ax.scatter(x, y, c=[_colour(s) for s in ok["strategy"]], zorder=3)
    front, best = [], -np.inf
    for i in np.lexsort((-y if maximise else y, x)):  # by latency, then the better score first
        score = y[i] if maximise else -y[i]
        if score > best:
            best = score
            front.append((x[i], y[i]))
    if front:
        ax.step(*zip(*front, strict=True), where="post", color="black", label="best trade-offs")
    picked = ok[ok["trial_id"] == pick]
    if len(picked):
        ax.scatter(
            picked["latency_ms_batch1"],
            picked[f"{metric}_mean"],
            marker="*",
            s=300,
            facecolors="none",
            edgecolors="black",
            zorder=4,
            label="the pick",
        )
    ax.set(xlabel="latency at batch 1 (ms)", ylabel=metric, title=f"{metric} against latency")
    _strategy_legend(ax, extra="best trade-offs", star=len(picked) > 0)
    fig.tight_layout()
    return fig
