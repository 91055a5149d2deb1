"""``raytl compare``: the figures on known inputs, and a real comparison of three schemes on Ray."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raytl.cli import main
from raytl.compare import config_key, parse_schemes
from raytl.compare_figures import (
    aggregate,
    rank_correlations,
    selection_regret,
    summarize,
    verdict,
)
from raytl.ensemble import checkpoint_location, fold_ensemble
from raytl.errors import RaytlError
from raytl.results import sampled_values
from raytl.space_file import load_space


def test_rank_correlations_on_known_inputs():
    # one swapped pair out of six: 5 concordant, 1 discordant -> tau = 4/6; d^2 = 2 -> rho = 0.8
    tau, rho = rank_correlations([1, 2, 3, 4], [0.1, 0.3, 0.2, 0.4])
    assert tau == pytest.approx(4 / 6) and rho == pytest.approx(0.8)
    tau, rho = rank_correlations([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert tau == pytest.approx(-1) and rho == pytest.approx(-1)
    # NaN pairs are dropped; fewer than three left or a constant side gives NaN
    tau, rho = rank_correlations([1, np.nan, 3, 4], [1, 2, np.nan, 4])
    assert math.isnan(tau) and math.isnan(rho)
    assert all(math.isnan(v) for v in rank_correlations([1, 2, 3], [0.5, 0.5, 0.5]))
    # ties: tau-b, as scipy defines it (x ties once): (P - Q) / sqrt((n0 - n1)(n0 - n2)) = 5/sqrt(5*6)
    tau, _ = rank_correlations([1, 1, 2, 3], [1, 2, 3, 4])
    assert tau == pytest.approx(5 / math.sqrt(30))


def test_selection_regret_on_known_inputs():
    # the best score (0.9) belongs to a configuration with test 0.80; the best test seen is 0.85
    chosen, regret = selection_regret([0.7, 0.9, 0.8], [0.85, 0.80, 0.84], oracle=0.85)
    assert chosen == pytest.approx(0.80) and regret == pytest.approx(0.05)
    chosen, regret = selection_regret([0.9, 0.9, np.nan], [0.7, 0.8, 0.99], oracle=0.99)
    assert chosen == pytest.approx(0.7) and regret == pytest.approx(0.29)  # tie: first; NaN ignored
    assert all(math.isnan(v) for v in selection_regret([np.nan], [0.5], oracle=0.5))


def test_config_key_ignores_order():
    assert config_key({"a": 1, "b": 0.5}) == config_key({"b": 0.5, "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_parse_schemes_errors_are_specific():
    assert parse_schemes("cv, segments") == ["cv", "segments"]
    with pytest.raises(RaytlError, match="kfold is not a scheme"):
        parse_schemes("holdout,kfold")
    with pytest.raises(RaytlError, match="twice"):
        parse_schemes("cv,cv")


def _trials(scheme: str, scores, tests, seconds, repeat=0, loss=False):
    metric = "val_loss" if loss else "val_accuracy"
    n = len(scores)
    return pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(n)],
            "scheme": scheme,
            "repeat": repeat,
            "seed": repeat,
            "status": ["completed"] * n,
            "epochs": [2] * n,
            "units": [3] * n,
            f"{metric}_mean": scores,
            f"{metric}_std": [0.01] * n,
            "test_accuracy": tests,
            "worker_seconds": [seconds] * n,
            "search_wall_seconds": seconds * n,
            "strategy": ["linear_probe"] * n,
        }
    )


def test_summarize_and_verdict_on_known_trials():
    trials = pd.concat(
        [
            # perfect ranking; the fold ensemble of its pick tested 0.92
            _trials("cv", [0.7, 0.8, 0.9], [0.70, 0.80, 0.90], seconds=30.0).assign(
                ensemble_test_accuracy=0.92
            ),
            _trials("segments", [0.9, 0.8, 0.7], [0.70, 0.80, 0.88], seconds=10.0),  # inverted
        ],
        ignore_index=True,
    )
    summary = summarize(trials, "val_accuracy").set_index("scheme")
    assert summary.loc["cv", "ensemble_test_accuracy"] == pytest.approx(0.92)
    assert math.isnan(summary.loc["segments", "ensemble_test_accuracy"])
    assert summary.loc["cv", "kendall_tau"] == pytest.approx(1.0)
    assert summary.loc["segments", "kendall_tau"] == pytest.approx(-1.0)
    assert summary.loc["cv", "regret"] == pytest.approx(
        0.0
    )  # the oracle is the best test over both
    assert summary.loc["segments", "selected_test_accuracy"] == pytest.approx(0.70)
    assert summary.loc["segments", "regret"] == pytest.approx(0.20)
    assert summary.loc["cv", "worker_seconds"] == pytest.approx(90.0)
    assert summary.loc["cv", "completed"] == 3 and summary.loc["cv", "epochs"] == 6
    text = " ".join(verdict(aggregate(summary.reset_index())))
    assert "segments was the cheapest" in text and "cv cost 3.0x" in text
    assert "cv picked the configuration closest" in text
    assert "cv's 3.0x cost bought 0.2000 test accuracy" in text
    assert (
        "**Final model (cv):** the fold ensemble of its pick tested 0.9200, above the refit of "
        "the same configuration on the whole pool (0.9000)." in text
    )
    assert "Final model (segments)" not in text


def test_summarize_orients_loss_scores():
    # a lower val_loss is better: the ranking must be read with the sign flipped
    trials = _trials("holdout", [0.9, 0.5, 0.1], [0.6, 0.7, 0.8], seconds=5.0, loss=True)
    row = summarize(trials, "val_loss").iloc[0]
    assert row["kendall_tau"] == pytest.approx(1.0) and row["regret"] == pytest.approx(0.0)


def test_aggregate_spreads_over_repeats():
    trials = pd.concat(
        [
            _trials("cv", [0.7, 0.8, 0.9], [0.70, 0.80, 0.90], seconds=30.0, repeat=0),
            _trials("cv", [0.9, 0.8, 0.7], [0.70, 0.80, 0.90], seconds=10.0, repeat=1),
        ],
        ignore_index=True,
    )
    agg = aggregate(summarize(trials, "val_accuracy")).set_index("scheme")
    assert agg.loc["cv", "repeats"] == 2
    assert agg.loc["cv", "kendall_tau_mean"] == pytest.approx(0.0)
    assert agg.loc["cv", "kendall_tau_std"] == pytest.approx(math.sqrt(2))
    assert agg.loc["cv", "worker_seconds_mean"] == pytest.approx(60.0)


def test_cli_rejects_unknown_scheme(space_file, capsys, tmp_path):
    path = space_file({"name": "x", "data": {"source": "digits"}})
    assert main(["compare", str(path), "--schemes", "cv,loo", "--output", str(tmp_path / "o")]) == 2
    assert "loo is not a scheme" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_end_to_end(space_file, tmp_path):
    """Three schemes, three trials each, on a real local Ray; every figure consistent."""
    path = space_file(
        {
            "name": "tiny-compare",
            # no feature cache: the probes then train through Ray Train, every scheme its own way
            "cache": False,
            "data": {"source": "digits", "image_size": 48, "limit": 400, "test_fraction": 0.25},
            "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
            "scheme": {"kind": "cv", "folds": 2, "segments": 2},
            "search": {"num_samples": 3, "max_concurrent": 2, "max_epochs": 1, "seed": 5},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
            "space": {
                "strategy": "linear_probe",
                "head_lr": {"loguniform": [1.0e-3, 5.0e-2]},
                "batch_size": 32,
            },
        }
    )
    out = tmp_path / "cmp"
    assert main(["compare", str(path), "--output", str(out)]) == 0

    summary = pd.read_parquet(out / "compare.parquet")
    trials = pd.read_parquet(out / "compare_trials.parquet")
    assert list(summary["scheme"]) == ["holdout", "cv", "segments"]
    assert (summary["trials"] == 3).all() and (summary["refit"] == 3).all()
    assert (summary["wall_seconds"] > 0).all() and (summary["worker_seconds"] > 0).all()
    assert (summary["epochs"] == 3).all()  # 3 trials x 1 epoch
    assert list(summary["units"]) == [1, 2, 2]
    # the same seeds: every scheme tried the same three (random start-up) configurations, so the
    # refits are shared and the oracle is the best of three test accuracies
    assert trials.groupby("scheme")["config_key"].apply(frozenset).nunique() == 1
    assert trials["test_accuracy"].between(0.1, 1.0).all()
    oracle = trials["test_accuracy"].max()
    for _, row in summary.iterrows():
        t = trials[trials["scheme"] == row["scheme"]]
        chosen = t.loc[t["val_accuracy_mean"].idxmax(), "test_accuracy"]
        assert row["selected_test_accuracy"] == pytest.approx(chosen)
        assert row["regret"] == pytest.approx(oracle - chosen) and row["regret"] >= 0
        assert row["worker_seconds"] == pytest.approx(t["worker_seconds"].sum())
    # cv's pick as its fold ensemble, tested on the same split: the pick's own checkpoint
    cv = trials[trials["scheme"] == "cv"].sort_values("trial_id")
    picked = cv.loc[cv["val_accuracy_mean"].idxmax()]
    config = load_space(path)
    data = config.data.load()
    hp = config.hyperparameters(sampled_values(picked))
    location = checkpoint_location(picked["checkpoint"], picked["storage"])
    expected = fold_ensemble(config, hp, data, location, 2).test_accuracy
    row = summary.set_index("scheme").loc["cv"]
    assert row["ensemble_test_accuracy"] == pytest.approx(expected)
    assert summary.set_index("scheme")["ensemble_test_accuracy"].drop("cv").isna().all()
    # which scheme costs more is a measured figure (docs/schemes.md), not asserted here: at this
    # size the fixed set-up per trial outweighs the work and the order of the costs is noise

    text = (out / "compare.md").read_text()
    for scheme in ("holdout", "cv", "segments"):
        assert f"| {scheme} |" in text
    assert "**Cost:**" in text and "**Selection:**" in text and "Machine:" in text
    assert "**Final model (cv):** the fold ensemble of its pick tested" in text
    for name in ("compare_val_vs_test.png", "compare_cost_fidelity.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 400
    for scheme in ("holdout", "cv", "segments"):
        assert (out / "runs" / f"{scheme}_seed5" / "results.parquet").is_file()
        assert (out / "runs" / f"{scheme}_seed5" / "tensorboard").is_dir()
