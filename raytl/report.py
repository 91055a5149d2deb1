"""``raytl report DIR``: ``DIR/report.md`` with the configuration, the ranked trials, the best
configuration and its test result, and PNG plots beside it. Written at the end of every search too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from raytl.errors import RaytlError

PLOTS = {
    "metric_per_trial.png": "Each trial's score, in start order, with the running best",
    "metric_by_strategy.png": "Scores by strategy",
    "metric_vs_freeze_depth.png": "Scores against freeze depth",
    "learning_curves.png": "Learning curves of the top trials",
    "confusion_matrix.png": "The refit model on the untouched test split",
}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_report(out: Path) -> Path:
    """Write ``out/report.md`` and its plots from the files a search left in ``out``."""
    from raytl import plots

    out = Path(out)
    results_path = out / "results.parquet"
    if not results_path.is_file():
        raise RaytlError(f"{out}: no results.parquet; expected the output folder of `raytl search`")
    results = pd.read_parquet(results_path)
    space = yaml.safe_load((out / "space.yaml").read_text()) if (out / "space.yaml").is_file() else {}
    metric = (space.get("search") or {}).get("metric", "val_accuracy")
    maximise = not metric.endswith("loss")
    history_path = out / "history.parquet"
    history = pd.read_parquet(history_path) if history_path.is_file() else pd.DataFrame(
        columns=["trial_id", "epoch", metric])
    best_metrics = out / "best" / "metrics.json"
    best = json.loads(best_metrics.read_text()) if best_metrics.is_file() else None

    ordered = results.sort_values("started_at") if "started_at" in results else results
    _save(plots.metric_per_trial(ordered, metric, maximise), out / "metric_per_trial.png")
    _save(plots.metric_by_strategy(results, metric), out / "metric_by_strategy.png")
    _save(plots.metric_vs_freeze_depth(results, metric), out / "metric_vs_freeze_depth.png")
    _save(plots.learning_curves(history, results, metric, maximise), out / "learning_curves.png")
    if best and best.get("test_labels"):
        class_names = json.loads((out / "best" / "class_names.json").read_text())
        _save(plots.confusion_figure(best["test_labels"], best["test_predictions"], class_names),
              out / "confusion_matrix.png")

    ranked = results.sort_values(f"{metric}_mean", ascending=not maximise, na_position="last")
    columns = [c for c in ("trial_id", "status", "strategy", "freeze_depth", "head_lr", "backbone_lr",
                           "layer_decay", "weight_decay", "augment", f"{metric}_mean", f"{metric}_std",
                           "epochs", "wall_seconds", "worker_seconds") if c in ranked]
    shown = ranked[[c for c in columns if c in ranked and ranked[c].notna().any()]]
    counts = results["status"].value_counts().to_dict()
    lines = [
        f"# Search report: {space.get('name', out.name)}",
        "",
        f"{len(results)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}), scheme "
        f"`{(space.get('scheme') or {}).get('kind', '?')}`, ranked by mean {metric} over units. "
        f"Worker time in all: {results['worker_seconds'].sum():.0f} s.",
        "",
        "## Best configuration",
        "",
    ]
    if best:
        hp = {k: v for k, v in best["hyperparameters"].items() if v is not None}
        lines += [
            f"Trial `{best['trial_id']}`: {metric} {best['search_value']:.4f} in the search; refit on "
            f"train+val ({best['train_images']} images) and tested once on {best['test_images']} "
            f"untouched images: **test accuracy {best['test_accuracy']:.4f}**.",
            "",
            "```yaml",
            yaml.safe_dump(hp, sort_keys=False).strip(),
            "```",
            "",
        ]
    else:
        lines += ["No refit model (no trial finished).", ""]
    lines += ["## Trials", "", _markdown_table(shown), "", "## Plots", ""]
    for name, caption in PLOTS.items():
        if (out / name).is_file():
            lines += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    lines += [
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
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
