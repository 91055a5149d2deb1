"""``raytl predict`` classifies in batches: the same answers as one image at a time, in the order
of the files, an unreadable file in the middle named in its place; ``--output`` writes them as a
CSV or Parquet table, one row per image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from raytl.cli import main
from raytl.data.images import decode_image
from raytl.models import load_saved_model
from raytl.predict import PREDICT_BATCH, predict_paths
from raytl.preprocess import BatchPreparer
from tests.conftest import save_test_model
from tests.test_stream import photo


def test_batches_give_the_answers_of_single_images_in_file_order(tmp_path):
    save_test_model(tmp_path / "model", 32)
    files = [photo(tmp_path / "images" / f"{i:03d}.jpg", seed=i) for i in range(PREDICT_BATCH + 6)]
    files[3].write_bytes(b"not an image")
    results = predict_paths(tmp_path / "model", [tmp_path / "images"], top=2)
    assert [r.path for r in results] == [str(f) for f in files]
    assert results[3].error and "not an image" in results[3].error and results[3].top == []

    loaded, pre, names, _ = load_saved_model(tmp_path / "model")
    loaded.eval()
    prepare = BatchPreparer(pre, torch.device("cpu"))
    for i in (0, 4, PREDICT_BATCH, PREDICT_BATCH + 5):  # both batches, either side of the bad one
        pixels = decode_image(files[i].read_bytes(), size=pre.image_size, max_pixels=10**8)
        with torch.no_grad():
            probs = torch.softmax(loaded(prepare(pixels[np.newaxis])), 1)[0]
        best = int(probs.argmax())
        assert results[i].top[0][0] == names[best]
        assert results[i].top[0][1] == pytest.approx(float(probs[best]), abs=1e-4)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    save_test_model(root / "model", 32)
    files = [photo(root / "images" / f"{i}.jpg", seed=i) for i in range(4)]
    files[1].write_bytes(b"not an image")
    return root / "model", root / "images"


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_output_writes_one_row_per_image_with_the_error_of_an_unreadable_one(
    tmp_path, saved_model, suffix, capsys
):
    model_dir, images = saved_model
    out = tmp_path / f"predictions{suffix}"
    assert main(["predict", str(model_dir), str(images), "--top", "2", "--output", str(out)]) == 1
    table = (
        pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out, keep_default_na=False)
    )
    assert list(table.columns) == ["path", "class_1", "prob_1", "class_2", "prob_2", "error"]
    assert list(table["path"]) == [str(images / f"{i}.jpg") for i in range(4)]
    bad, good = table.iloc[1], table.drop(index=1)
    assert "not an image" in bad["error"]
    assert pd.isna(bad["class_1"]) if suffix == ".parquet" else bad["class_1"] == ""
    assert (good["error"] == "").all() and set(good["class_1"]) <= {"ant", "bee", "cow"}
    probs = good[["prob_1", "prob_2"]].astype(float)
    assert (probs["prob_1"] >= probs["prob_2"]).all() and (probs["prob_1"] <= 1).all()
    expected = predict_paths(model_dir, [images], top=2)
    assert [r.top[0][0] for r in expected if not r.error] == list(good["class_1"])
    assert np.allclose(probs["prob_1"], [r.top[0][1] for r in expected if not r.error])
    assert f"wrote 4 row(s) to {out}" in capsys.readouterr().out


def test_an_unknown_output_suffix_is_one_line_before_any_work(tmp_path, capsys):
    # the model folder does not exist: the suffix is refused before it is looked at
    assert main(["predict", str(tmp_path / "no-model"), str(tmp_path), "--output", "p.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p.json" in err and ".csv, .parquet" in err
    assert not (tmp_path / "p.json").exists()
