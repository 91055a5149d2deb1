"""``raytl predict`` classifies in batches: the same answers as one image at a time, in the order
of the files, an unreadable file in the middle named in its place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytl.data.images import decode_image
from raytl.models import create_model, load_saved_model, save_model
from raytl.predict import PREDICT_BATCH, predict_paths
from raytl.preprocess import BatchPreparer, preprocessing_for
from tests.test_stream import photo


def test_batches_give_the_answers_of_single_images_in_file_order(tmp_path):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, "package")
    save_model(
        tmp_path / "model",
        model,
        backbone="efficientnet_lite0",
        class_names=["ant", "bee", "cow"],
        preprocessing=preprocessing_for(model, 32),
    )
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
