"""``raytl evaluate``: a model trained by ``raytl train`` scored on other real image files (and
the same images as Parquet shards); its figures are scikit-learn's on the predictions it writes."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
)

from tests.test_cli import raytl, write_folder

CLASSES = ["digit_0", "digit_1", "digit_2"]


def write_digits(root, digits, digit_values, first, count):
    """``count`` images of each digit, from its ``first``-th, as PNG and JPEG files in
    ``digit_N`` folders."""
    for k in digit_values:
        folder = root / f"digit_{k}"
        folder.mkdir(parents=True)
        for j, index in enumerate(np.flatnonzero(digits.labels == k)[first : first + count]):
            image = Image.fromarray(digits.images[index]).resize((24, 24), Image.NEAREST)
            image.save(folder / f"{j}.{'png' if j % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A model of three digit classes, trained by ``raytl train`` (no Ray), and held-out images
    of those classes (the next 20 of each) with one unreadable file."""
    root = tmp_path_factory.mktemp("evaluate")
    train = write_folder(root / "train", digits)  # the first 30 of each class
    space = root / "space.yaml"
    space.write_text(
        f"data: {{source: imagefolder, path: '{train}', image_size: 32, test_fraction: 0.25}}\n"
        "search: {max_epochs: 4}\n"
        "space: {strategy: linear_probe, head_lr: 0.05, batch_size: 8}\n"
    )
    proc = raytl("train", str(space), "--output", str(root / "model"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    held_out = write_digits(root / "held_out", digits, [0, 1, 2], first=30, count=20)
    (held_out / "digit_1" / "broken.png").write_bytes(b"not a png at all")
    return root / "model", held_out


def figures_line(stdout):
    match = re.search(
        r"accuracy (\d\.\d{4})  balanced accuracy (\d\.\d{4})  macro-F1 (\d\.\d{4})", stdout
    )
    assert match, stdout
    return [float(x) for x in match.groups()]


@pytest.mark.slow
def test_evaluate_writes_scikit_learn_figures_and_names_the_skipped_file(tmp_path, trained):
    model, held_out = trained
    out = tmp_path / "eval"
    proc = raytl("evaluate", str(model), str(held_out), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    names = ["evaluation.md", "per_class.parquet", "predictions.parquet", "confusion_matrix.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    predictions = pd.read_parquet(out / "predictions.parquet")
    assert list(predictions.columns[:4]) == ["index", "true", "predicted", "probability"]
    assert len(predictions) == 60  # the unreadable file is not a row
    assert predictions["true"].value_counts().to_dict() == dict.fromkeys(CLASSES, 20)
    assert predictions["probability"].between(0, 1).all()
    true, predicted = predictions["true"], predictions["predicted"]
    expected = [
        accuracy_score(true, predicted),
        balanced_accuracy_score(true, predicted),
        f1_score(true, predicted, average="macro"),
    ]
    assert figures_line(proc.stdout) == pytest.approx(expected, abs=5e-5)
    assert expected[0] > 0.6  # a trained model: most held-out digits are recognised

    per_class = pd.read_parquet(out / "per_class.parquet")
    assert list(per_class["class"]) == CLASSES
    p, r, f, s = precision_recall_fscore_support(true, predicted, labels=CLASSES)
    assert np.allclose(per_class["precision"], p) and np.allclose(per_class["recall"], r)
    assert np.allclose(per_class["f1"], f) and list(per_class["support"]) == list(s)

    report = (out / "evaluation.md").read_text()
    assert "![confusion matrix](confusion_matrix.png)" in report
    assert f"| accuracy | {expected[0]:.4f} |" in report and "| digit_2 |" in report
    assert "broken.png" in report and "broken.png" in proc.stdout
    assert "skipped 1 unreadable file(s)" in proc.stdout
    wrong = int((true != predicted).sum())
    assert f"misclassified: {wrong} of 60" in proc.stdout
    listed = report.split("## Misclassified", 1)[1].split("`index`", 1)[0]
    assert listed.count("\n| ") - 2 == min(wrong, 16)  # header and rule rows, one per mistake


@pytest.mark.slow
def test_streamed_and_parquet_data_give_the_same_answers_and_name_files(tmp_path, trained):
    model, held_out = trained
    held = raytl("evaluate", str(model), str(held_out), "--output", str(tmp_path / "held"))
    streamed = raytl(
        "evaluate", str(model), str(held_out), "--mode", "stream", "--output", str(tmp_path / "s")
    )
    assert held.returncode == 0 and streamed.returncode == 0, held.stderr + streamed.stderr
    a = pd.read_parquet(tmp_path / "held" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "s" / "predictions.parquet")
    assert a["file"].isna().all()  # held images are not named
    assert b["file"].notna().all() and (b["file"].str.split("/").str[-2] == b["true"]).all()
    assert (a["predicted"] == b["predicted"]).all()
    assert np.allclose(a["probability"], b["probability"], atol=1e-5)

    shards = tmp_path / "shards"
    assert raytl("data", "convert", str(held_out), str(shards)).returncode == 0
    proc = raytl("evaluate", str(model), str(shards), "--output", str(tmp_path / "pq"))
    assert proc.returncode == 0, proc.stderr
    c = pd.read_parquet(tmp_path / "pq" / "predictions.parquet")
    assert figures_line(proc.stdout) == figures_line(held.stdout)
    pairs = lambda t: sorted(zip(t["true"], t["predicted"], strict=True))  # noqa: E731
    assert pairs(c) == pairs(a)


@pytest.mark.slow
def test_a_class_the_model_does_not_know_is_one_clear_error(tmp_path, trained, digits):
    model, held_out = trained
    data = tmp_path / "data"
    shutil.copytree(held_out, data)
    write_digits(data, digits, [3], first=0, count=3)
    shutil.rmtree(data / "digit_2")  # a class the model knows but the data lacks is fine
    proc = raytl("evaluate", str(model), str(data))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raytl: error")]
    assert len(errors) == 1 and "'digit_3'" in errors[0] and "unknown to the model" in errors[0]

    shutil.rmtree(data / "digit_3")
    proc = raytl("evaluate", str(model), str(data))
    assert proc.returncode == 0, proc.stderr
    assert "40 images of 2 classes (the model has 3)" in proc.stdout
