"""``raytl report DIR``: ``DIR/report.md`` with the configuration, the ranked trials, the best
configuration with its test figures and per-class table, and PNG plots beside it. Written at the
end of every search too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import yaml
from matplotlib.figure import Figure

from raytl import plots
from raytl.config import metric_mode
from raytl.errors import RaytlError
from raytl.metrics import VAL_METRICS, per_class_table
from raytl.rundir import END_FILE
from raytl.storage import atomic_write

# the refit's figures beside its test accuracy in the summary (best/metrics.json)
TEST_FIGURES = {
    "test_balanced_accuracy": "balanced accuracy",
    "test_macro_f1": "macro-F1",
    "test_top5_accuracy": "top-5 accuracy",
}
PLOTS = {
    "metric_per_trial.png": "Each trial's score, in start order, with the running best",
    "metric_by_strategy.png": "Scores by strategy",
    "metric_vs_freeze_depth.png": "Scores against freeze depth",
    "learning_curves.png": "Learning curves of the top trials",
    "metric_vs_latency.png": "Scores against each model's batch-1 latency: the front of best "
    "trade-offs and the pick (star)",
    "confusion_matrix.png": "The refit model on the untouched test split",
}


def save_figure(fig: Figure, path: Path) -> None:
    """A plot as PNG, written then renamed; the figure is closed."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def write_report(out: Path) -> Path:
    """Write ``out/report.md`` and its plots from the files a search left in ``out``."""
    out = Path(out)
    results_path = out / "results.parquet"
    if not results_path.is_file():
        raise RaytlError(f"{out}: no results.parquet; expected the output folder of `raytl search`")
    results = pd.read_parquet(results_path)
    space = (
        yaml.safe_load((out / "space.yaml").read_text()) if (out / "space.yaml").is_file() else {}
    )
    metric = (space.get("search") or {}).get("metric", "val_accuracy")
    best_metrics = out / "best" / "metrics.json"
    best = json.loads(best_metrics.read_text()) if best_metrics.is_file() else None
    write_plots(out, results, metric, best)
    lines = [
        *_summary_lines(out, results, space, metric, best),
        *_per_class_lines(out, best),
        *_trial_lines(out, results, metric),
        *_closing_lines(out, space),
    ]
    return atomic_write(out / "report.md", "\n".join(lines))


def write_plots(out: Path, results: pd.DataFrame, metric: str, best: dict[str, Any] | None) -> None:
    """The report's PNGs beside it (the confusion matrix only when there is a refit model)."""
    maximise = metric_mode(metric) == "max"
    history_path = out / "history.parquet"
    history = (
        pd.read_parquet(history_path)
        if history_path.is_file()
        else pd.DataFrame(columns=["trial_id", "epoch", metric])
    )
    ordered = results.sort_values("started_at") if "started_at" in results else results
    save_figure(plots.metric_per_trial(ordered, metric, maximise), out / "metric_per_trial.png")
    save_figure(plots.metric_by_strategy(results, metric), out / "metric_by_strategy.png")
    save_figure(plots.metric_vs_freeze_depth(results, metric), out / "metric_vs_freeze_depth.png")
    save_figure(
        plots.learning_curves(history, results, metric, maximise), out / "learning_curves.png"
    )
    if "latency_ms_batch1" in results:
        pick = str(best["trial_id"]) if best else None
        save_figure(
            plots.metric_vs_latency(results, metric, maximise, pick), out / "metric_vs_latency.png"
        )
    if best and best.get("test_labels"):
        class_names = json.loads((out / "best" / "class_names.json").read_text())
        save_figure(
            plots.confusion_figure(best["test_labels"], best["test_predictions"], class_names),
            out / "confusion_matrix.png",
        )


def _summary_lines(
    out: Path,
    results: pd.DataFrame,
    space: dict[str, Any],
    metric: str,
    best: dict[str, Any] | None,
) -> list[str]:
    counts = results["status"].value_counts().to_dict()
    lines = [
        f"# Search report: {space.get('name', out.name)}",
        "",
        f"{len(results)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}), scheme "
        f"`{(space.get('scheme') or {}).get('kind', '?')}`, ranked by mean {metric} over units. "
        f"Worker time in all: {results['worker_seconds'].sum():.0f} s.{_ended_by(out)}",
        "",
        "## Best configuration",
        "",
    ]
    if not best:
        return [*lines, "No refit model (no trial finished).", ""]
    hp = {k: v for k, v in best["hyperparameters"].items() if v is not None}
    kept = (
        f"its {best['members']} fold models kept as one ensemble (averaged softmax)"
        if best.get("final") == "fold_ensemble"
        else f"refit on train+val ({best['train_images']} images)"
    )
    return [
        *lines,
        f"Trial `{best['trial_id']}`: {metric} {best['search_value']:.4f} in the search; {kept} "
        f"and tested once on {best['test_images']} "
        f"untouched images: **test accuracy {best['test_accuracy']:.4f}**"
        + "".join(
            f", {label} {best[key]:.4f}"
            for key, label in TEST_FIGURES.items()
            if isinstance(best.get(key), int | float)
        )
        + ".",
        "",
        "```yaml",
        yaml.safe_dump(hp, sort_keys=False).strip(),
        "```",
        "",
    ]


def _ended_by(out: Path) -> str:
    """' The time budget (600 s) ended the search.' when it did (search_end.json)."""
    path = out / END_FILE
    ended = json.loads(path.read_text()) if path.is_file() else {}
    if ended.get("ended_by") != "time_budget":
        return ""
    return f" The time budget ({ended['time_budget_s']:.0f} s) ended the search."


def _per_class_lines(out: Path, best: dict[str, Any] | None) -> list[str]:
    """The refit model's precision, recall, F1 and support per class on the test split."""
    names = out / "best" / "class_names.json"
    if not best or not best.get("test_labels") or not names.is_file():
        return []
    table = per_class_table(
        best["test_labels"], best["test_predictions"], json.loads(names.read_text())
    )
    return [
        "### Per class on the test split",
        "",
        markdown_table(table),
        "",
        "Precision, recall and F1 of each class (scikit-learn's), support: its test images.",
        "",
    ]


def _trial_lines(out: Path, results: pd.DataFrame, metric: str) -> list[str]:
    ranked = results.sort_values(
        f"{metric}_mean", ascending=metric_mode(metric) == "min", na_position="last"
    )
    columns = [
        c
        for c in (
            "trial_id",
            "status",
            "strategy",
            "freeze_depth",
            "head_lr",
            "backbone_lr",
            "layer_decay",
            "weight_decay",
            "augment",
            f"{metric}_mean",
            f"{metric}_std",
            *(f"{other}_mean" for other in VAL_METRICS if other != metric),
            "epochs",
            "wall_seconds",
            "worker_seconds",
        )
        if c in ranked
    ]
    shown = ranked[[c for c in columns if c in ranked and ranked[c].notna().any()]]
    lines = ["## Trials", "", markdown_table(shown), "", "## Plots", ""]
    for name, caption in PLOTS.items():
        if (out / name).is_file():
            lines += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    return lines


def _closing_lines(out: Path, space: dict[str, Any]) -> list[str]:
    return [
        "## Review in TensorBoard",
        "",
        "```bash",
        f"tensorboard --logdir {out / 'tensorboard'} --host 127.0.0.1",
        "```",
        "",
        "Scalars per trial and per unit; the HParams tab compares trials by strategy, freeze depth "
        "and learning rates (parallel coordinates, scatter plots).",
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(space, sort_keys=False).strip(),
        "```",
        "",
    ]
