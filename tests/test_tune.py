"""The searcher raytl gives Tune: trials ASHA stopped enter the Optuna study as pruned."""

from __future__ import annotations

import optuna
import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raytl.cluster import ray_session
from raytl.tune import PruningOptunaSearch

EPOCHS = 4


def trainable(config: dict) -> None:
    """A trial whose score is its configuration's ``x`` at every epoch (x * epoch / EPOCHS)."""
    for epoch in range(1, EPOCHS + 1):
        tune.report({"score": config["x"] * epoch / EPOCHS, "epoch": epoch, "total_epochs": EPOCHS})


def space(trial: optuna.Trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)


@pytest.mark.slow
def test_trials_asha_stopped_are_pruned_in_the_study_with_their_intermediate_values(tmp_path):
    searcher = PruningOptunaSearch(
        space=space, metric="score", mode="max", sampler=optuna.samplers.RandomSampler(seed=0)
    )
    with ray_session(None):
        grid = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=ASHAScheduler(
                    time_attr="epoch", max_t=EPOCHS, grace_period=1, reduction_factor=2
                ),
                metric="score",
                mode="max",
                num_samples=8,
                max_concurrent_trials=1,
            ),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="t", verbose=0),
        ).fit()
    searcher = PruningOptunaSearch(space=space, metric="score", mode="max")
    searcher.restore_from_dir(str(tmp_path / "t"))  # the study as Tune saved it
    trials = searcher._ot_study.trials
    assert len(trials) == 8 == len(grid)
    by_x = {round(r.config["x"], 12): r.metrics["epoch"] for r in grid}
    states = {t.state for t in trials}  # with these 8 draws ASHA stops some and not others
    assert states == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    for t in trials:
        last_epoch = by_x[round(t.params["x"], 12)]
        if last_epoch < EPOCHS:  # stopped by ASHA: pruned, valued at its last report
            assert t.state == optuna.trial.TrialState.PRUNED
            assert sorted(t.intermediate_values) == list(range(1, last_epoch + 1))
            assert t.value == pytest.approx(t.params["x"] * last_epoch / EPOCHS)
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE
            assert t.value == pytest.approx(t.params["x"])
