"""A search's trials as tables: ``results.parquet`` (one row per trial) and ``history.parquet``
(one row per trial and epoch), each trial's status, and the best row.

Built from Tune's ``ResultGrid`` by hand rather than with ``ResultGrid.get_dataframe``: a row needs
values that the grid's flat frame does not hold (inactive hyperparameters as empty, the per-unit
lists, the driver's launch clock, the status rule below), and the history merges the epochs that
a resumed trial brought back (:data:`~raytl.attempts.RESUMED_HISTORY`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raytl.attempts import HISTORY_COLUMNS, RESUMED_HISTORY
from raytl.config import SpaceConfig, metric_mode
from raytl.metrics import VAL_METRICS
from raytl.space import HYPERPARAMETER_NAMES
from raytl.storage import atomic_write


def trial_status(last: dict[str, Any], failed: bool = False) -> str:
    """What a finished trial's last report says: completed, stopped (by ASHA) or error."""
    if failed:
        return "error"
    total = int(last.get("total_epochs") or 0)
    return "completed" if total and int(last.get("epoch") or 0) >= total else "stopped"


def _trial_id(result: Any) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name)


def _metric_columns(m: dict[str, Any], metric: str) -> dict[str, Any]:
    """Every validation metric's mean and std over units (the search's first; NaN where not
    recorded: top-5 accuracy with 5 classes or fewer), and each unit's own values."""
    row: dict[str, Any] = {}
    for name in (metric, *(other for other in VAL_METRICS if other != metric)):
        row[f"{name}_mean"] = m.get(name, math.nan)
        row[f"{name}_std"] = m.get(f"{name}_std", math.nan)
    unit_names = sorted({k.split("/")[1] for k in m if k.startswith("unit/")})
    row["unit_names"] = unit_names
    for name in VAL_METRICS:
        row[f"unit_{name}"] = [m.get(f"unit/{u}/{name}") for u in unit_names]
    row["unit_nodes"] = [m.get(f"unit/{u}/node_id") for u in unit_names]
    row["probe_passes"] = m.get("probe_passes", 0.0)  # a converged probe's passes, mean over units
    return row


def _cost_columns(result: Any, m: dict[str, Any], times: dict[str, float]) -> dict[str, Any]:
    frame = result.metrics_dataframe
    has_time = frame is not None and len(frame) and "timestamp" in frame
    launched = times.get("launched_at", math.nan)
    return {
        "epochs": int(m.get("epoch") or 0),
        "wall_seconds": m.get("time_total_s", math.nan),
        "worker_seconds": m.get("worker_seconds", math.nan),
        "startup_seconds": m.get("startup_seconds", math.nan),
        "restarts": m.get("restarts", 0),
        "restart_startup_seconds": m.get("restart_startup_seconds", math.nan),
        "nodes": m.get("nodes"),
        "head_only": m.get("head_only"),
        "launched_at": launched,
        "overhead_seconds": m.get("ready_at", math.nan) - launched,
        "trial_seconds": times.get("finished_at", math.nan) - launched,
        "started_at": float(frame["timestamp"].min()) if has_time else math.nan,  # 1st report
    }


def _checkpoint_path(result: Any, m: dict[str, Any]) -> str | None:
    """The trial's latest checkpoint: Ray Train's (its report carries the path, see Tune's
    ``TuneReportCallback``), or the Tune trial's own (a trial on cached features)."""
    path = m.get("checkpoint_path") or (result.checkpoint.path if result.checkpoint else None)
    return str(path) if path else None


def results_table(
    grid: Any, config: SpaceConfig, clock: dict[str, dict[str, float]] | None = None
) -> pd.DataFrame:
    """One row per trial: sampled values (missing where inactive), status, metrics, costs.

    ``clock`` (the progress callback's) adds when the driver launched each trial and saw it end,
    so ``overhead_seconds`` (launch to the first training step) and ``trial_seconds`` are real.
    """
    rows = []
    for result in grid:
        m, cfg = result.metrics or {}, result.config or {}
        row: dict[str, Any] = {
            "trial_id": _trial_id(result),
            "status": trial_status(m, failed=result.error is not None),
        }
        row.update({key: cfg.get(key, None) for key in HYPERPARAMETER_NAMES})
        hp = config.hyperparameters(
            {k: v for k, v in cfg.items() if k in HYPERPARAMETER_NAMES and v is not None}
        )
        row["strategy"], row["backbone"] = hp.strategy, hp.backbone
        row["scheme"], row["units"] = config.scheme.kind, m.get("units")
        row.update(_metric_columns(m, config.search.metric))
        row.update(_cost_columns(result, m, (clock or {}).get(str(row["trial_id"]), {})))
        row["error"] = str(result.error).splitlines()[0][:300] if result.error else None
        row["path"] = result.path
        row["checkpoint"] = _checkpoint_path(result, m)
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("trial_id").reset_index(drop=True) if len(table) else table


def history_table(grid: Any) -> pd.DataFrame:
    """One row per trial and epoch (mean over units), for learning curves.

    After a restore Tune repeats the epochs since the last checkpoint (ray#4187): the last row of
    each (trial_id, epoch) wins. It also forgets the results it had not saved before the driver
    died; a resumed trial's first report brings those epochs back (``resumed_history``).
    """
    frames = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or not len(frame) or "epoch" not in frame:
            continue
        recovered = [
            pd.DataFrame(json.loads(v))
            for v in frame.get(RESUMED_HISTORY, [])
            if isinstance(v, str) and v
        ]
        frame = pd.concat([*recovered, frame], ignore_index=True)
        frame = frame[[c for c in frame.columns if c in HISTORY_COLUMNS]].copy()
        frame["trial_id"] = _trial_id(result)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["trial_id", *HISTORY_COLUMNS])
    history = pd.concat(frames, ignore_index=True).dropna(subset=["epoch"])
    history["epoch"] = history["epoch"].astype(int)
    history = history.drop_duplicates(["trial_id", "epoch"], keep="last")
    return history.sort_values(["trial_id", "epoch"]).reset_index(drop=True)


def write_parquet(path: Path, table: pd.DataFrame) -> None:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))


def write_results(output: Path, table: pd.DataFrame, history: pd.DataFrame | None = None) -> None:
    """results.parquet, results.csv (and history.parquet), each written then renamed."""
    write_parquet(output / "results.parquet", table)
    if history is not None:
        write_parquet(output / "history.parquet", history)
    atomic_write(output / "results.csv", lambda tmp: table.to_csv(tmp, index=False))


def best_row(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The best trial that did not fail (ties: the one that ran more epochs)."""
    column = f"{metric}_mean"
    ok = table[table["status"] != "error"].dropna(subset=[column]) if len(table) else table
    if not len(ok):
        return None
    ok = ok.sort_values([column, "epochs"], ascending=[metric_mode(metric) == "min", False])
    return ok.iloc[0]


def format_top(table: pd.DataFrame, metric: str, n: int = 10) -> str:
    if not len(table):
        return "no trials ran"
    column = f"{metric}_mean"
    shown = table.sort_values(column, ascending=metric_mode(metric) == "min", na_position="last")
    columns = [
        "trial_id",
        "status",
        "strategy",
        "freeze_depth",
        "head_lr",
        "backbone_lr",
        column,
        f"{metric}_std",
        "epochs",
        "worker_seconds",
    ]
    shown = shown[[c for c in columns if c in shown]].head(n)
    with pd.option_context(
        "display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4g}".format
    ):
        return f"top trials by {metric} ({len(table)} in all):\n{shown.to_string(index=False)}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def sampled_values(row: pd.Series) -> dict[str, Any]:
    """A results row's sampled hyperparameters as plain Python values (inactive ones left out)."""
    sampled = {k: row[k] for k in HYPERPARAMETER_NAMES if k in row and not _missing(row[k])}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in sampled.items()}
