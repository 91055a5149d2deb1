"""Model size and latency beside accuracy: measured per backbone, and the limits on the pick."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from raytl.errors import RaytlError
from raytl.latency import measure
from raytl.models import create_model
from raytl.search import pick, with_costs
from raytl.space_file import parse_space


def test_measure_counts_the_task_models_parameters_and_times_both_batches():
    figures = measure("efficientnet_lite0", 10, 32, 1)
    model = create_model("efficientnet_lite0", 10, "none")
    assert figures["params"] == sum(p.numel() for p in model.parameters())
    assert figures["latency_ms_batch1"] > 0 and figures["latency_ms_batch64"] > 0


TABLE = pd.DataFrame(
    {
        "trial_id": ["a", "b", "c"],
        "status": ["completed", "completed", "error"],
        "backbone": ["efficientnet_lite2", "efficientnet_lite0", "efficientnet_lite0"],
        "val_accuracy_mean": [0.95, 0.90, math.nan],
        "epochs": [3, 3, 0],
    }
)
COSTS = {
    "efficientnet_lite0": {"params": 3.4e6, "latency_ms_batch1": 8.0, "latency_ms_batch64": 90.0},
    "efficientnet_lite2": {"params": 4.8e6, "latency_ms_batch1": 15.0, "latency_ms_batch64": 200.0},
}


def config(**search):
    return parse_space({"search": search})


def test_the_pick_respects_the_deployment_limits():
    table = with_costs(TABLE, COSTS)
    assert list(table["params"]) == [4.8e6, 3.4e6, 3.4e6]
    assert pick(table, config())["trial_id"] == "a"  # the most accurate
    assert pick(table, config(max_latency_ms=10))["trial_id"] == "b"  # the one fast enough
    assert pick(table, config(max_params=4e6))["trial_id"] == "b"
    assert pick(table, config(max_latency_ms=20, max_params=5e6))["trial_id"] == "a"
    with pytest.raises(RaytlError, match=r"no trial's model fits search.max_latency_ms=5.0"):
        pick(table, config(max_latency_ms=5))


def test_the_latency_plot_draws_the_front_of_best_trade_offs_and_marks_the_pick():
    from raytl.plots import metric_vs_latency

    trials = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "strategy": ["fine_tune", "linear_probe", "fine_tune", "lp_ft"],
            "latency_ms_batch1": [10.0, 10.0, 20.0, 5.0],
            "val_accuracy_mean": [0.8, 0.9, 0.95, 0.7],
        }
    )
    fig = metric_vs_latency(trials, "val_accuracy", True, "b")
    (front,) = fig.axes[0].lines
    assert list(zip(front.get_xdata(), front.get_ydata(), strict=True)) == [
        (5.0, 0.7),
        (10.0, 0.9),  # a (10 ms, 0.8) is beaten by b at the same latency
        (20.0, 0.95),
    ]
    star = fig.axes[0].collections[-1]
    assert star.get_offsets().tolist() == [[10.0, 0.9]]
