"""The paired fidelity study: its figures on known inputs, its draws, and a real study on Ray."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import kendalltau

from raytl.cli import main
from raytl.compare import config_key
from raytl.errors import RaytlError
from raytl.paired import draw_configurations, scheme_label
from raytl.paired_stats import bootstrap_intervals, paired_summary, rule_lines
from raytl.space_file import load_space

SPACE = {
    "name": "tiny-paired",
    "data": {"source": "digits", "image_size": 32, "limit": 500, "test_fraction": 0.3},
    "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
    "scheme": {"kind": "cv", "folds": 2, "segments": 2},
    "search": {"max_concurrent": 2, "max_epochs": 1, "seed": 3},
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    "space": {
        "strategy": {"choice": ["linear_probe", "fine_tune"]},
        "freeze_depth": {"int": [5, 7], "when": {"strategy": ["fine_tune"]}},
        "head_lr": {"loguniform": [1.0e-3, 5.0e-2]},
        "batch_size": 32,
    },
}


def _trials(scheme, scores, tests, seconds, repeat=0, pool=100):
    n = len(scores)
    return pd.DataFrame(
        {
            "trial_id": [f"{scheme}{i}" for i in range(n)],
            "config_key": [f"c{i}" for i in range(n)],
            "scheme": scheme,
            "repeat": repeat,
            "pool_size": pool,
            "val_accuracy_mean": scores,
            "val_accuracy_std": 0.01,
            "test_accuracy": tests,
            "worker_seconds": seconds,
            "search_wall_seconds": 2.0 * seconds * n,
        }
    )


TESTS = list(np.linspace(0.5, 0.95, 10))


def test_summary_and_intervals_on_known_rankings():
    rng = np.random.default_rng(0)
    trials = pd.concat(
        [
            _trials("cv", TESTS, TESTS, seconds=3.0),  # ranks perfectly
            _trials("holdout", list(rng.permutation(TESTS)), TESTS, seconds=1.0),  # at random
            _trials("segments", TESTS[::-1], TESTS, seconds=1.5),  # inverted
        ],
        ignore_index=True,
    )
    summary = paired_summary(trials, "val_accuracy").set_index("scheme")
    assert summary.loc["cv", "kendall_tau"] == pytest.approx(1.0)
    assert summary.loc["segments", "kendall_tau"] == pytest.approx(-1.0)
    assert summary.loc["segments", "regret"] == pytest.approx(0.95 - 0.5)
    assert summary.loc["cv", "regret"] == pytest.approx(0.0)
    assert summary.loc["holdout", "worker_seconds"] == pytest.approx(10.0)

    intervals = bootstrap_intervals(trials, "val_accuracy", draws=300).set_index("scheme")
    cv, holdout, seg = intervals.loc["cv"], intervals.loc["holdout"], intervals.loc["segments"]
    assert cv["kendall_tau_low"] == pytest.approx(1.0)  # every draw ranks perfectly
    assert cv["kendall_tau_high"] == pytest.approx(1.0)
    assert seg["kendall_tau_minus_cv_high"] == pytest.approx(-2.0)
    assert holdout["kendall_tau_low"] < holdout["kendall_tau"] < holdout["kendall_tau_high"]
    assert holdout["kendall_tau_minus_cv_high"] < 0  # a random ranking is worse than a perfect one
    assert math.isnan(cv["kendall_tau_minus_cv"])  # cv is the reference

    lines = rule_lines(intervals.reset_index(), summary.reset_index())
    assert len(lines) == 2  # holdout and segments, each against cv
    assert "segments's Kendall tau is below cv's by 2.00" in " ".join(lines)
    assert "at 50% of its worker-seconds" in " ".join(lines)  # 15 of cv's 30


def test_a_difference_the_intervals_cannot_resolve_is_stated_as_such():
    rng = np.random.default_rng(1)
    noisy = [t + rng.normal(0, 0.08) for t in TESTS]
    also_noisy = [t + rng.normal(0, 0.08) for t in TESTS]
    trials = pd.concat(
        [
            _trials("cv", noisy, TESTS, seconds=3.0),
            _trials("segments", also_noisy, TESTS, seconds=1.0),
        ],
        ignore_index=True,
    )
    intervals = bootstrap_intervals(trials, "val_accuracy", draws=300)
    row = intervals.set_index("scheme").loc["segments"]
    assert row["kendall_tau_minus_cv_low"] < 0 < row["kendall_tau_minus_cv_high"]
    (line,) = rule_lines(intervals, paired_summary(trials, "val_accuracy"))
    assert "no difference in Kendall tau between segments and cv is detectable" in line
    width = max(-row["kendall_tau_minus_cv_low"], row["kendall_tau_minus_cv_high"])
    assert f"within {width:.2f} of cv's" in line and "at 33% of its worker-seconds" in line


def test_draws_are_distinct_seeded_and_follow_the_conditions(space_file):
    config = load_space(space_file(SPACE))
    points = draw_configurations(config, 6, seed=1)
    assert len({config_key(p) for p in points}) == 6
    assert points == draw_configurations(config, 6, seed=1)
    assert points != draw_configurations(config, 6, seed=2)
    for p in points:
        assert 1e-3 <= p["head_lr"] <= 5e-2
        assert ("freeze_depth" in p) == (p["strategy"] == "fine_tune")
        assert "batch_size" not in p  # a constant is not drawn
    few = {**SPACE, "space": {"strategy": {"choice": ["linear_probe", "fine_tune"]}}}
    with pytest.raises(RaytlError, match="only 2 distinct configuration"):
        draw_configurations(load_space(space_file(few)), 3, seed=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pool-sizes", "100"], "add --paired K"),
        (["--paired", "4", "--pool-sizes", "100,x"], "'x' in '100,x': expected integers >= 10"),
        (["--paired", "4", "--segments", "2,2"], "expected distinct integers"),
        (["--paired", "4", "--refit-sample", "2"], "refits all K configurations"),
    ],
)
def test_bad_sweep_options_get_one_line(space_file, tmp_path, capsys, flags, message):
    path = space_file(SPACE)
    assert main(["compare", str(path), "--output", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_segments_sweep_labels_each_count():
    assert [scheme_label("segments", n, [2, 4]) for n in (2, 4)] == ["segments_2", "segments_4"]
    assert scheme_label("segments", 3, [3]) == "segments"
    assert scheme_label("cv", 3, [2, 4]) == "cv"


def test_a_pool_too_small_for_its_segments_fails_before_any_trial(space_file, tmp_path, capsys):
    path = space_file(SPACE)
    flags = ["--paired", "3", "--pool-sizes", "100", "--segments", "2,6"]
    assert main(["compare", str(path), "--output", str(tmp_path / "o"), *flags]) == 2
    assert "needs at least 12 per class" in capsys.readouterr().err  # 6 segments x 2
    assert not (tmp_path / "o" / "runs").exists()  # nothing ran


@pytest.mark.slow
def test_a_paired_study_with_repeats_pool_sizes_and_segments(space_file, tmp_path):
    """cv and segments (2 and 3 segments) score the same 3 configurations per repeat, on pools of
    150 and 300 images, 2 repeats: every sweep at once, a real local Ray, real refits."""
    space = {**SPACE, "space": {**SPACE["space"], "strategy": "linear_probe"}}
    space["space"].pop("freeze_depth")
    path = space_file(space)
    out = tmp_path / "paired"
    flags = ["--paired", "3", "--repeats", "2", "--pool-sizes", "150,300", "--segments", "2,3"]
    argv = ["compare", str(path), "--schemes", "cv,segments", "--output", str(out), *flags]
    assert main(argv) == 0

    trials = pd.read_parquet(out / "paired_trials.parquet")
    config = load_space(path)
    assert set(trials["scheme"]) == {"cv", "segments_2", "segments_3"}
    assert sorted(trials["pool_size"].unique()) == [150, 300]
    assert (trials["status"] == "completed").all() and trials["test_accuracy"].notna().all()
    for (_, repeat), cell in trials.groupby(["pool_size", "repeat"]):
        drawn = {round(p["head_lr"], 12) for p in draw_configurations(config, 3, seed=3 + repeat)}
        for _, t in cell.groupby("scheme"):  # every scheme scored exactly the drawn three
            assert {round(v, 12) for v in t["head_lr"]} == drawn and len(t) == 3
        # one refit per configuration, shared by the schemes
        assert cell.groupby("config_key")["test_accuracy"].nunique().eq(1).all()
    assert set(trials[trials["scheme"] == "segments_2"]["units"]) == {2}
    assert set(trials[trials["scheme"] == "segments_3"]["units"]) == {3}

    summary = pd.read_parquet(out / "paired.parquet")
    assert len(summary) == 2 * 2 * 3
    for _, row in summary.iterrows():
        t = trials[
            (trials["pool_size"] == row["pool_size"])
            & (trials["repeat"] == row["repeat"])
            & (trials["scheme"] == row["scheme"])
        ].sort_values("trial_id")
        tau = kendalltau(t["val_accuracy_mean"], t["test_accuracy"]).statistic
        assert row["kendall_tau"] == pytest.approx(tau, nan_ok=True)
        best = trials[
            (trials["pool_size"] == row["pool_size"]) & (trials["repeat"] == row["repeat"])
        ]["test_accuracy"].max()
        chosen = t.loc[t["val_accuracy_mean"].idxmax(), "test_accuracy"]
        assert row["regret"] == pytest.approx(best - chosen)
        assert (row["scheme"] == "cv") != math.isnan(row["ensemble_test_accuracy"])

    intervals = pd.read_parquet(out / "paired_intervals.parquet")
    assert len(intervals) == 2 * 3 and (intervals["repeats"] == 2).all()
    ok = intervals.dropna(subset=["kendall_tau_low"])
    assert (ok["kendall_tau_low"] <= ok["kendall_tau_high"]).all()
    text = (out / "compare.md").read_text()
    assert "## What the study supports" in text
    assert text.count("At pool size 150") == 2 and text.count("At pool size 300") == 2
    for name in ("paired_tau.png", "paired_cost_regret.png", "paired_val_vs_test.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 400
    assert (out / "runs" / "segments_3_pool300_repeat1" / "results.parquet").is_file()
