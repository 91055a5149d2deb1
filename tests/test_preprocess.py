"""Pixels to model input: the batched augmentation on the device (one crop and flip per image)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from raytl import preprocess
from raytl.preprocess import (
    AUGMENT_RATIO,
    AUGMENT_SCALE,
    BatchPreparer,
    Preprocessing,
    crop_and_flip,
    random_resized_boxes,
)

PRE = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 32)


def noise(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_identical_images_get_their_own_crops_and_flips():
    prepare = BatchPreparer(PRE, torch.device("cpu"))
    torch.manual_seed(0)
    x = prepare(np.repeat(noise(1), 16, axis=0), augment=True)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    low = (0 - torch.tensor(PRE.mean)) / torch.tensor(PRE.std)
    high = (1 - torch.tensor(PRE.mean)) / torch.tensor(PRE.std)
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= low - 1e-5).all()
    assert (per_channel.max(1).values <= high + 1e-5).all()
    distinct = {x[i].flatten().numpy().tobytes() for i in range(len(x))}
    assert len(distinct) == len(x)  # 16 copies of one image, 16 different inputs


def test_augmentation_is_seeded_by_torch():
    prepare = BatchPreparer(PRE, torch.device("cpu"))
    images = noise(8)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(prepare(images, augment=True))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_a_whole_image_crop_is_the_image_or_its_mirror(monkeypatch):
    """roi_align's alignment: a box over the whole image at its own size gives it back exactly."""
    x = torch.rand(64, 3, 16, 16)
    whole = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(64, 1)
    monkeypatch.setattr(preprocess, "random_resized_boxes", lambda n, h, w, rng: whole[:n])
    out = crop_and_flip(x, 16, np.random.default_rng(0))
    same = (out - x).abs().amax((1, 2, 3)) < 1e-6
    mirrored = (out - x.flip(-1)).abs().amax((1, 2, 3)) < 1e-6
    assert (same ^ mirrored).all()
    assert 16 < int(mirrored.sum()) < 48  # each image flipped with probability 1/2


def test_boxes_are_drawn_as_torchvisions_random_resized_crop():
    torch.manual_seed(0)
    height, width, n = 40, 30, 4000
    boxes = random_resized_boxes(n, height, width, np.random.default_rng(0))
    left, top, right, bottom = boxes.unbind(1)
    w, h = right - left, bottom - top
    assert (left >= 0).all() and (top >= 0).all()
    assert (right <= width).all() and (bottom <= height).all()
    assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision's (i, j, h, w)
    area = w * h / (height * width)
    slack = 2 / min(height, width)  # w and h are rounded to whole pixels
    assert area.min() >= AUGMENT_SCALE[0] - slack and area.max() <= AUGMENT_SCALE[1] + slack
    image = torch.empty(3, height, width)
    reference = torch.tensor(
        [RandomResizedCrop.get_params(image, AUGMENT_SCALE, AUGMENT_RATIO)[2:] for _ in range(n)]
    ).float()  # (h, w) per draw
    # the same distribution: mean sizes agree to within a few standard errors
    for ours, theirs in ((h, reference[:, 0]), (w, reference[:, 1])):
        standard_error = float(ours.std()) * math.sqrt(2 / n)
        assert float(ours.mean()) == pytest.approx(float(theirs.mean()), abs=4 * standard_error)


def test_an_image_no_try_fits_gets_the_centre_crop():
    """Like torchvision: after 10 misses, the largest centred crop within the ratio range."""
    boxes = random_resized_boxes(5, 4, 64, np.random.default_rng(0))  # every try is too tall
    assert boxes.tolist() == [[29.0, 0.0, 34.0, 4.0]] * 5  # w = round(4 * 4/3) = 5, centred


def test_unaugmented_batches_are_resized_and_normalised_as_before():
    """No augmentation: the same numbers as before the device path (uint8 -> float, interpolate
    with the backbone's mode and antialias, clamp, normalise), in channels_last."""
    prepare = BatchPreparer(PRE, torch.device("cpu"))
    images = noise(4, size=20)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True)
    expected = (x.clamp(0, 1) - torch.tensor(PRE.mean).view(1, 3, 1, 1)) / torch.tensor(
        PRE.std
    ).view(1, 3, 1, 1)
    out = prepare(images)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_load_gathers_rows_and_finish_matches_call():
    prepare = BatchPreparer(PRE, torch.device("cpu"))
    images, rows = noise(10), np.array([7, 2, 2, 5])
    loaded = prepare.load(images, rows)
    assert loaded.dtype == torch.uint8 and loaded.shape == (4, 3, 24, 24)
    assert torch.equal(loaded.permute(0, 2, 3, 1), torch.from_numpy(images[rows]))
    torch.manual_seed(1)
    a = prepare.finish(loaded, augment=True)
    torch.manual_seed(1)
    assert torch.equal(a, prepare(images[rows], augment=True))
    given = prepare.finish(loaded, augment=True, rng=np.random.default_rng(5))
    assert torch.equal(given, prepare.finish(loaded, True, np.random.default_rng(5)))
    assert not torch.equal(given, prepare.finish(loaded, True, np.random.default_rng(6)))
