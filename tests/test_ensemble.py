"""Fold ensembles: k fold models kept as one saved model whose softmax is their average."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from raytl.ensemble import fold_models
from raytl.errors import ConfigError
from raytl.models import SoftmaxEnsemble, create_model, load_saved_model, save_model
from raytl.predict import predict_paths
from raytl.preprocess import BatchPreparer, preprocessing_for
from raytl.search import run_search
from raytl.space_file import parse_space
from raytl.trial import scheme_units


def test_a_saved_ensemble_predicts_the_average_of_its_members_softmax(tmp_path):
    torch.manual_seed(0)
    members = [create_model("efficientnet_lite0", 3, "package") for _ in range(2)]
    for m in members:
        m.eval()
    pre = preprocessing_for(members[0], 32)
    save_model(
        tmp_path / "model",
        SoftmaxEnsemble(members),
        backbone="efficientnet_lite0",
        class_names=["ant", "bee", "cow"],
        preprocessing=pre,
        extra={"ensemble": 2},
    )
    loaded, _, _, config = load_saved_model(tmp_path / "model")
    assert isinstance(loaded, SoftmaxEnsemble) and len(loaded.members) == 2
    pixels = np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    x = BatchPreparer(pre, torch.device("cpu"))(pixels)
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(1) for m in members]).mean(0)
    got = predict_paths(tmp_path / "model", [tmp_path / f"{i}.png" for i in range(3)], top=3)
    for row, probs in zip(got, expected, strict=True):
        by_class = dict(row.top)
        assert [by_class[c] for c in ("ant", "bee", "cow")] == pytest.approx(
            probs.tolist(), abs=1e-4
        )


def test_fold_ensemble_needs_cross_validation():
    raw = {"scheme": {"kind": "holdout"}, "search": {"final": "fold_ensemble"}}
    with pytest.raises(ConfigError, match="search.final: fold_ensemble keeps cv's fold models"):
        parse_space(raw)


@pytest.mark.slow
def test_a_cv_search_keeps_the_best_trials_fold_models_as_best(tmp_path, digits):
    """Two trials (a probe on cached features, a fine-tuning one on a Ray Train worker): each
    checkpoint's fold models score, on their own fold's validation images, exactly what the trial
    reported; the best trial's become best/, an ensemble raytl predict reads."""
    space = {
        "name": "folds",
        "data": {"source": "digits", "image_size": 32, "limit": 300},
        "scheme": {"kind": "cv", "folds": 2},
        "search": {
            "num_samples": 2,
            "max_concurrent": 1,
            "max_epochs": 1,
            "scheduler": "fifo",
            "final": "fold_ensemble",
            "seed_configs": [{"strategy": "linear_probe"}, {"strategy": "fine_tune"}],
        },
        "space": {
            "strategy": {"choice": ["linear_probe", "fine_tune"]},
            "freeze_depth": 6,
            "head_lr": 1.0e-2,
            "batch_size": 32,
        },
    }
    config = parse_space(space, "folds.yaml")
    run_search(config, tmp_path, echo=lambda line: None)
    results = pd.read_parquet(tmp_path / "results.parquet")
    assert sorted(results["strategy"]) == ["fine_tune", "linear_probe"]
    data = config.data.load()
    units = scheme_units(config, data)
    for _, row in results.iterrows():
        hp = config.hyperparameters({"strategy": row["strategy"]})
        models = fold_models(config, hp, len(data.class_names), row["checkpoint"], 2)
        for unit, model, reported in zip(units, models, row["unit_val_accuracy"], strict=True):
            prepare = BatchPreparer(preprocessing_for(model, 32), torch.device("cpu"))
            with torch.no_grad():
                predicted = model(prepare(data.images[unit.val])).argmax(1).numpy()
            assert (predicted == data.labels[unit.val]).mean() == pytest.approx(reported, abs=1e-6)
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    saved = json.loads((tmp_path / "best" / "config.json").read_text())
    assert metrics["final"] == "fold_ensemble" and metrics["members"] == 2 == saved["ensemble"]
    assert metrics["test_images"] == len(config.data.split_test(data)[1])
    assert 0.3 < metrics["test_accuracy"] <= 1.0  # 10 classes: chance is 0.1
