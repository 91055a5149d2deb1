"""The metrics users select by, on real units of imbalanced digits: a unit's balanced accuracy,
macro-F1 and top-5 accuracy are scikit-learn's on its predictions; ``class_weight: balanced`` is
scikit-learn's weighting; every metric reaches the trial's report, results.parquet, TensorBoard
and report.md (whose refit section carries the per-class table)."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from sklearn.utils.class_weight import compute_class_weight

from raytl.attempts import AttemptClock, epoch_report
from raytl.errors import ConfigError, RaytlError
from raytl.metrics import (
    VAL_METRICS,
    balanced_class_weights,
    check_metric,
    evaluation_counts,
    scored,
)
from raytl.models import to_json
from raytl.refit import RefitResult
from raytl.report import write_report
from raytl.results import history_table, results_table, write_results
from raytl.space_file import parse_space
from raytl.tensorboard import SearchBoard
from tests.conftest import unit_trainer

NO_VAL = np.array([], dtype=np.int64)


def make_trainer(data, train, val, probe_passes=None, **kw):
    """A linear probe on efficientnet_lite0's packaged weights (the probe trains in one report:
    to convergence, or ``probe_passes`` passes where there is no validation split)."""
    settings = {"strategy": "linear_probe", "head_lr": 0.01, "batch_size": 32, **kw}
    return unit_trainer(data, train, val, probe_passes=probe_passes, **settings)


@pytest.fixture(scope="module")
def imbalanced(digits):
    """A training pool of 140 images of each of the digits 0 and 1 and 14 of each other digit,
    shuffled, and a balanced held-out set of 30 further images of every digit."""
    rng = np.random.default_rng(0)
    pool, held = [], []
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(digits.labels == digit))
        n = 140 if digit < 2 else 14
        pool.append(rows[:n])
        held.append(rows[n : n + 30])
    return rng.permutation(np.concatenate(pool)), np.concatenate(held)


@pytest.fixture(scope="module")
def two_units(digits, imbalanced):
    """Two real units (2-fold cross-validation of the pool): their trainers and first reports,
    as the trial's loop labels them."""
    pool, _ = imbalanced
    folds = [pool[0::2], pool[1::2]]
    trainers, metrics = [], []
    for unit in range(2):
        trainer = make_trainer(digits, folds[1 - unit], folds[unit])
        report = trainer.run_epoch()
        metrics.append({**report, "unit": unit, "unit_name": f"fold_{unit}", "node_id": "n0"})
        trainers.append(trainer)
    return trainers, metrics


def trial_report(metrics):
    return epoch_report(
        metrics,
        units=len(metrics),
        workers=1,
        total_epochs=1,
        clock=AttemptClock(worker_seconds=1.0),
        restart_startup_seconds=math.nan,
    )


def test_a_units_metrics_are_scikit_learns_on_its_validation_predictions(digits, two_units):
    trainers, metrics = two_units
    for trainer, report in zip(trainers, metrics, strict=True):
        # the validation pass of run_epoch (the probe's cached features), once more
        result = trainer.evaluate(trainer.val_idx, head_only=True)
        true, predicted = digits.labels[trainer.val_idx], result.predictions
        assert report["val_accuracy"] == pytest.approx(np.mean(true == predicted))
        assert report["val_balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(true, predicted)
        )
        assert report["val_macro_f1"] == pytest.approx(f1_score(true, predicted, average="macro"))
        # imbalanced: the class-averaged scores are not the accuracy
        assert abs(report["val_balanced_accuracy"] - report["val_accuracy"]) > 0.01
        assert report["val_accuracy"] > 0.6  # a trained probe (chance: 0.1)


def test_top5_accuracy_is_scikit_learns_with_ten_classes(digits, two_units, imbalanced):
    trainer = two_units[0][0]
    _, held = imbalanced
    result = trainer.evaluate(held)  # the whole network's forward pass
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(trainer.prepare(digits.images[held])).float().numpy()
    expected = top_k_accuracy_score(digits.labels[held], logits, k=5, labels=range(10))
    assert result.top5_accuracy == pytest.approx(expected)
    assert result.accuracy < result.top5_accuracy <= 1.0
    assert all("val_top5_accuracy" in m for m in two_units[1])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_counts_summed_over_shards_give_the_scores_of_the_whole():
    """What the ranks that share a unit do (group.sum of their counts)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 6, (50,), generator=generator)  # classes 6 and 7 never true
    whole = scored(evaluation_counts(logits, labels, 8), 8, logits.argmax(1).numpy())
    shares = evaluation_counts(logits[::2], labels[::2], 8)
    shares += evaluation_counts(logits[1::2], labels[1::2], 8)
    summed = scored(shares, 8, np.empty(0))
    for name in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy"):
        assert getattr(summed, name) == pytest.approx(getattr(whole, name))
    predicted = logits.argmax(1).numpy()
    assert whole.macro_f1 == pytest.approx(f1_score(labels.numpy(), predicted, average="macro"))
    assert whole.balanced_accuracy == pytest.approx(
        balanced_accuracy_score(labels.numpy(), predicted)
    )


def test_top5_is_not_recorded_with_five_classes_or_fewer(synthetic, tmp_path):
    rows = np.random.default_rng(0).permutation(len(synthetic))
    trainer = make_trainer(synthetic, rows[:120], rows[120:])
    metrics = trainer.run_epoch()
    assert "val_top5_accuracy" not in metrics
    assert {"val_balanced_accuracy", "val_macro_f1"} <= set(metrics)
    assert math.isnan(trainer.evaluate(rows[120:]).top5_accuracy)
    report = trial_report([{**metrics, "unit": 0, "unit_name": "holdout", "node_id": "n0"}])
    assert "val_top5_accuracy" not in report and "unit/holdout/val_top5_accuracy" not in report
    assert "val_macro_f1_std" in report

    board = SearchBoard(tmp_path, parse_space({"data": {"source": "synthetic"}}).space)
    board.result("t4", {}, report)
    board.end("t4", "completed")
    board.close()
    tags = scalar_tags(tmp_path / "trial_t4")
    assert "val_macro_f1" in tags and "final/val_macro_f1" in tags
    assert not {t for t in tags if "top5" in t}

    for n_classes in (2, 5):
        with pytest.raises(RaytlError, match="val_top5_accuracy needs more than 5 classes"):
            check_metric("val_top5_accuracy", n_classes)
    check_metric("val_top5_accuracy", 6)
    for metric in VAL_METRICS[:-1]:
        check_metric(metric, 2)


def test_balanced_class_weight_is_scikit_learns_and_weighs_only_the_training_loss(
    digits, imbalanced
):
    pool, held = imbalanced
    train = pool[: len(pool) // 2]
    labels = digits.labels[train]
    expected = compute_class_weight("balanced", classes=np.arange(10), y=labels)
    assert np.allclose(balanced_class_weights(labels, 10), expected)
    # a class absent from a unit's training labels weighs 0; the others as scikit-learn's
    no_nine = labels[labels != 9]
    weights = balanced_class_weights(no_nine, 10)
    assert weights[9] == 0
    assert np.allclose(
        weights[:9], compute_class_weight("balanced", classes=np.arange(9), y=no_nine)
    )

    plain = make_trainer(digits, train, NO_VAL, probe_passes=5)
    balanced = make_trainer(digits, train, NO_VAL, probe_passes=5, class_weight="balanced")
    assert plain.class_weight is None
    assert torch.allclose(balanced.class_weight, torch.tensor(expected, dtype=torch.float32))
    logits = torch.randn(len(labels), 10, generator=torch.Generator().manual_seed(0))
    target = torch.from_numpy(labels)
    per_image = F.cross_entropy(logits, target, reduction="none")
    w = balanced.class_weight[target]
    assert balanced._loss(logits, target) == pytest.approx(float((w * per_image).sum() / w.sum()))
    assert plain._loss(logits, target) == pytest.approx(float(per_image.mean()))

    # trained the same number of passes, the weighted head predicts the two frequent digits less
    # often on balanced data (where they are 2 of 10 classes)
    plain.run_epoch()
    balanced.run_epoch()
    share = {}
    for name, trainer in (("plain", plain), ("balanced", balanced)):
        result = trainer.evaluate(held)
        share[name] = np.isin(result.predictions, [0, 1]).mean()
        # validation's loss is unweighted, whatever the training loss
        trainer.model.eval()
        with torch.no_grad():
            held_logits = trainer.model(trainer.prepare(digits.images[held])).float()
        unweighted = F.cross_entropy(held_logits, torch.from_numpy(digits.labels[held]))
        assert result.loss == pytest.approx(float(unweighted), rel=1e-4)
    assert share["balanced"] < share["plain"]


def test_class_weight_in_the_space_file():
    def parsed(entry):
        return parse_space({"space": {"class_weight": entry}}).space["class_weight"]

    assert parsed({"choice": ["none", "balanced"]}).values == ("none", "balanced")
    assert parsed("balanced").values == ("balanced",)
    fixed = parse_space({"space": {"class_weight": "balanced"}})
    assert fixed.hyperparameters({}).class_weight == "balanced"  # the constant
    assert parse_space({}).hyperparameters({}).class_weight == "none"  # the default
    with pytest.raises(ConfigError, match="space.class_weight: expected one of none, balanced"):
        parsed("inverse")


def scalar_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def fake_result(report, trial_id, config):
    """What results_table reads of a Tune result."""
    return SimpleNamespace(
        metrics={**report, "trial_id": trial_id},
        config=config,
        error=None,
        path=f"/nowhere/train_{trial_id}",
        checkpoint=None,
        metrics_dataframe=pd.DataFrame([report]),
    )


def test_every_metric_reaches_results_tensorboard_and_the_report(
    digits, two_units, imbalanced, tmp_path
):
    trainers, metrics = two_units
    report = trial_report(metrics)
    for name in VAL_METRICS:
        values = [m[name] for m in metrics]
        assert report[name] == pytest.approx(np.mean(values))
        assert report[f"{name}_std"] == pytest.approx(np.std(values))
        assert report[f"unit/fold_1/{name}"] == metrics[1][name]

    space = {"data": {"source": "digits"}, "search": {"metric": "val_macro_f1"}}
    config = parse_space({**space, "space": {"strategy": "linear_probe", "head_lr": 0.01}})
    grid = [fake_result(report, "t1", {"strategy": "linear_probe", "head_lr": 0.01})]
    table = results_table(grid, config)
    write_results(tmp_path, table, history_table(grid))
    results = pd.read_parquet(tmp_path / "results.parquet")
    history = pd.read_parquet(tmp_path / "history.parquet")
    for name in VAL_METRICS:
        assert results[f"{name}_mean"].iloc[0] == pytest.approx(report[name])
        assert results[f"{name}_std"].iloc[0] == pytest.approx(report[f"{name}_std"])
        assert list(results[f"unit_{name}"].iloc[0]) == pytest.approx([m[name] for m in metrics])
        assert history[name].iloc[0] == pytest.approx(report[name])
    assert list(results.columns[results.columns.str.endswith("_mean")])[0] == "val_macro_f1_mean"

    board = SearchBoard(tmp_path / "tensorboard", config.space, metric="val_macro_f1")
    board.result("t1", {"strategy": "linear_probe"}, report)
    board.end("t1", "completed")
    board.close()
    trial = scalar_tags(tmp_path / "tensorboard" / "trial_t1")
    unit = scalar_tags(tmp_path / "tensorboard" / "trial_t1" / "fold_0")
    for name in VAL_METRICS:
        assert trial[name] == [pytest.approx(report[name])]
        assert trial[f"{name}_std"] == [pytest.approx(report[f"{name}_std"])]
        assert trial[f"final/{name}"] == trial[f"best/{name}"] == trial[name]
        assert unit[name] == [pytest.approx(metrics[0][name])]
    write_refit_section(tmp_path, digits, trainers[0], imbalanced[1], table)
    assert_report(tmp_path, digits, results)


def write_refit_section(out, digits, trainer, held, table):
    """best/ as refit_best writes it: metrics.json from a RefitResult, class_names.json."""
    result = trainer.evaluate(held)
    refit = RefitResult(
        test_accuracy=result.accuracy,
        test_loss=result.loss,
        test_images=len(held),
        train_images=len(trainer.train_idx),
        train_loss=[0.5],
        seconds=1.0,
        device="cpu",
        torch_threads=1,
        test_predictions=result.predictions.tolist(),
        test_labels=digits.labels[held].tolist(),
        preprocessing=trainer.pre,
        test_balanced_accuracy=result.balanced_accuracy,
        test_macro_f1=result.macro_f1,
        test_top5_accuracy=result.top5_accuracy,
    )
    summary = {
        "trial_id": "t1",
        "hyperparameters": dataclasses.asdict(trainer.hp),
        "search_metric": "val_macro_f1",
        "search_value": float(table["val_macro_f1_mean"].iloc[0]),
        **refit.figures(),
    }
    (out / "best").mkdir()
    (out / "best" / "metrics.json").write_text(to_json(summary))
    (out / "best" / "class_names.json").write_text(json.dumps(list(digits.class_names)))
    space = {"name": "metrics", "search": {"metric": "val_macro_f1"}}
    (out / "space.yaml").write_text(yaml.safe_dump(space))


def assert_report(out, digits, results):
    best = json.loads((out / "best" / "metrics.json").read_text())
    true, predicted = best["test_labels"], best["test_predictions"]
    assert best["test_macro_f1"] == pytest.approx(f1_score(true, predicted, average="macro"))
    text = write_report(out).read_text()
    assert f"macro-F1 {best['test_macro_f1']:.4f}" in text
    assert f"balanced accuracy {balanced_accuracy_score(true, predicted):.4f}" in text
    assert f"top-5 accuracy {best['test_top5_accuracy']:.4f}" in text
    section = text.split("### Per class on the test split", 1)[1].split("##", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 10
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted)
    for row, p, r, f, s, name in zip(
        rows, precision, recall, f1, support, digits.class_names, strict=True
    ):
        assert row == f"| {name} | {p:.4g} | {r:.4g} | {f:.4g} | {s} |"
    trials = text.split("## Trials", 1)[1]
    header = trials.splitlines()[2]
    assert "val_macro_f1_mean | val_macro_f1_std | val_accuracy_mean" in header
    for name in VAL_METRICS:
        assert f"{name}_mean" in header
    assert f"{results['val_top5_accuracy_mean'].iloc[0]:.4g}" in trials
