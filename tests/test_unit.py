"""The per-worker loop on real data: strategies learn digits, checkpoints resume exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytl.data.splits import carve_test, stratified_split
from raytl.preprocess import BatchPreparer, preprocessing_for
from tests.conftest import unit_trainer


@pytest.fixture(scope="module")
def digit_splits(digits):
    pool, test = carve_test(digits.labels, 0.2, 0, digits.class_names)
    train, val = stratified_split(digits.labels, pool, 0.2, 0, digits.class_names, "validation")
    return train, val, test


def make_trainer(data, train, val, **kw):
    return unit_trainer(data, train, val, image_size=64, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("linear_probe", {"head_lr": 0.01}),
        ("fine_tune", {"freeze_depth": 3, "head_lr": 0.003, "backbone_lr": 0.001}),
    ],
)
def test_strategy_learns_digits_in_one_epoch(digits, digit_splits, strategy, extra):
    train, val, test = digit_splits
    trainer = make_trainer(digits, train, val, strategy=strategy, **extra)
    metrics = trainer.run_epoch()
    assert metrics["epoch"] == 1 and metrics["train_loss"] > 0
    assert metrics["head_only"] == (strategy == "linear_probe")
    result = trainer.evaluate(test)
    assert result.accuracy > 0.6, result.accuracy  # chance is 0.1
    assert len(result.predictions) == len(test)


def test_batch_preparer_resizes_and_normalises():
    model_pre = preprocessing_for(__import__("timm").create_model("resnet18"), 32)
    prepare = BatchPreparer(model_pre, torch.device("cpu"))
    images = np.full((3, 8, 8, 3), 255, dtype=np.uint8)
    x = prepare(images)
    assert x.shape == (3, 3, 32, 32)
    expected = (1.0 - torch.tensor(model_pre.mean)) / torch.tensor(model_pre.std)
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-4)
    augmented = prepare(
        np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8), augment=True
    )
    assert augmented.shape == (4, 3, 32, 32)


def test_checkpoint_resumes_exactly(synthetic):
    pool, _ = carve_test(synthetic.labels, 0.2, 0, synthetic.class_names)
    train, val = stratified_split(
        synthetic.labels, pool, 0.25, 0, synthetic.class_names, "validation"
    )
    kw = dict(strategy="lp_ft", epochs=2, freeze_depth=6, batch_size=32)  # probe + 2 epochs
    straight = make_trainer(synthetic, train, val, **kw)
    for _ in range(3):
        last = straight.run_epoch()
    first = make_trainer(synthetic, train, val, **kw)
    first.run_epoch()
    first.run_epoch()
    path_state = first.state_dict()
    buffer = __import__("io").BytesIO()
    torch.save(path_state, buffer)
    buffer.seek(0)
    resumed = make_trainer(synthetic, train, val, **kw)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epoch == 2
    again = resumed.run_epoch()
    assert again["epoch"] == 3 and again["phase"] == "fine_tune"
    assert again["val_loss"] == pytest.approx(last["val_loss"], rel=1e-4)
