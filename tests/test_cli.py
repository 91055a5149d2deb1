"""The command line: `raytl train` then `raytl predict` on real image files, and clear user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def raytl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raytl", *args], capture_output=True, text=True, timeout=timeout
    )


def write_folder(root, digits, per_class=30):
    """A real image folder: PNG and JPEG files, one sub-folder per class, from the digits."""
    for k, name in enumerate(digits.class_names[:3]):
        folder = root / f"digit_{name}"
        folder.mkdir(parents=True)
        for j, index in enumerate(np.flatnonzero(digits.labels == k)[:per_class]):
            image = Image.fromarray(digits.images[index]).resize((24, 24), Image.NEAREST)
            image.save(folder / f"{j}.{'png' if j % 2 else 'JPG'}")
    return root


@pytest.mark.slow
def test_train_then_predict_on_an_image_folder(tmp_path, space_file, digits):
    folder = write_folder(tmp_path / "images", digits)
    (folder / "digit_0" / "broken.png").write_bytes(b"not a png at all")
    space = space_file(
        {
            "data": {
                "source": "imagefolder",
                "path": str(folder),
                "image_size": 32,
                "test_fraction": 0.25,
            },
            "search": {"max_epochs": 4},
            "space": {"strategy": "linear_probe", "head_lr": 0.05, "batch_size": 8},
        }
    )
    out = tmp_path / "out"
    proc = raytl("train", str(space), "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "epoch  4/4" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["images"] == 90 and metrics["test_accuracy"] > 0.6  # 3 classes
    assert "broken.png" in (out / "skipped.txt").read_text()
    assert json.loads((out / "class_names.json").read_text()) == ["digit_0", "digit_1", "digit_2"]

    proc = raytl("predict", str(out), str(folder / "digit_1"), "--top", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 30
    top = [line.split(": ")[1].split()[0] for line in lines]
    assert top.count("digit_1") >= 20  # most of the class is recognised

    again = raytl("train", str(space), "--output", str(out))
    assert (
        again.returncode == 2
        and "already exists" in again.stderr
        and "Traceback" not in again.stderr
    )


def test_data_inspect_lists_classes_and_bad_files(tmp_path, digits):
    folder = write_folder(tmp_path / "images", digits, per_class=3)
    (folder / "digit_2" / "empty.jpg").write_bytes(b"")
    proc = raytl("data", "inspect", str(folder), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "digit_0" in proc.stdout and "empty.jpg" in proc.stdout


def test_missing_data_folder_is_one_clear_line(tmp_path, space_file):
    space = space_file({"data": {"source": "imagefolder", "path": str(tmp_path / "nope")}})
    proc = raytl("train", str(space), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "data.path" in proc.stderr


def test_overwrite_clears_only_what_a_search_wrote(tmp_path):
    from raytl.rundir import clear_search_outputs

    (tmp_path / "tensorboard" / "trial_x").mkdir(parents=True)
    (tmp_path / "results.parquet").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    clear_search_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_publish_copies_results_and_runs_to_storage(tmp_path):
    from raytl.rundir import publish

    out = tmp_path / "out"
    (out / "tensorboard" / "trial_1" / "fold_0").mkdir(parents=True)
    (out / "tensorboard" / "trial_1" / "fold_0" / "events.out").write_bytes(b"events")
    (out / "best").mkdir()
    (out / "best" / "metrics.json").write_text("{}")
    (out / "results.csv").write_text("trial_id\n")
    publish(out, f"file://{tmp_path}/shared/exp")
    copied = sorted(
        p.relative_to(tmp_path / "shared" / "exp").as_posix()
        for p in (tmp_path / "shared" / "exp").rglob("*")
        if p.is_file()
    )
    assert copied == ["best/metrics.json", "results.csv", "tensorboard/trial_1/fold_0/events.out"]
