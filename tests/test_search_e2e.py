"""End to end: a real search on a local Ray (Tune + Optuna + ASHA over 2-worker Ray Train trials)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raytl.config import parse_space
from raytl.search import run_search

SPACE = {
    "name": "e2e",
    "data": {"source": "digits", "image_size": 48, "limit": 600, "test_fraction": 0.2},
    "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
    "scheme": {"kind": "cv", "folds": 2},
    "search": {"num_samples": 4, "max_concurrent": 1, "max_epochs": 2, "grace_period": 1,
               "reduction_factor": 2, "seed": 3},
    "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
    "space": {
        "strategy": {"choice": ["linear_probe", "fine_tune"]},
        "freeze_depth": {"int": [3, 7], "when": {"strategy": ["fine_tune"]}},
        "head_lr": {"loguniform": [1.0e-2, 5.0e-2]},
        "backbone_lr": {"loguniform": [3.0e-4, 3.0e-3], "when": {"strategy": ["fine_tune"]}},
        "batch_size": 16,
    },
}


@pytest.mark.slow
def test_search_end_to_end(tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    config = parse_space(SPACE, "e2e.yaml")
    table = run_search(config, out, echo=lambda line: None)

    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 4 == len(table)
    assert (out / "results.csv").is_file() and (out / "space.yaml").is_file()
    assert set(results["status"]) <= {"completed", "stopped"}
    assert set(results["strategy"]) == {"linear_probe", "fine_tune"}  # both explored
    assert ((results["epochs"] >= 1) & (results["epochs"] <= 2)).all()  # ASHA or max_epochs
    assert (results["status"] == "completed").sum() >= 1
    probes = results[results["strategy"] == "linear_probe"]
    tunes = results[results["strategy"] == "fine_tune"]
    assert probes["freeze_depth"].isna().all() and probes["backbone_lr"].isna().all()
    assert tunes["freeze_depth"].between(3, 7).all() and tunes["backbone_lr"].notna().all()
    for _, row in results.iterrows():
        assert list(row["unit_names"]) == ["fold_0", "fold_1"]
        accs = np.array(row["unit_val_accuracy"], dtype=float)
        assert np.isclose(accs.mean(), row["val_accuracy_mean"])
        assert np.isclose(accs.std(), row["val_accuracy_std"])
        assert row["worker_seconds"] > 0 and row["wall_seconds"] > 0
    assert results["val_accuracy_mean"].max() > 0.4  # 10 classes: chance is 0.1
    assert (out / "ray" / "tune").is_dir()  # the Ray experiment, for resuming

    best = out / "best"
    for name in ("model.safetensors", "config.json", "class_names.json", "metrics.json"):
        assert (best / name).is_file()
    metrics = pd.read_json(best / "metrics.json", typ="series")
    assert metrics["test_accuracy"] > 0.4

    from raytl.data import load_data

    digits = load_data("digits")
    image = tmp_path / "seven.png"
    index = int(np.flatnonzero(digits.labels == 7)[0])
    Image.fromarray(digits.images[index]).resize((48, 48)).save(image)
    proc = subprocess.run([sys.executable, "-m", "raytl", "predict", str(best), str(image)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(str(image)) and line.count(" 0.") + line.count(" 1.0") == 3
