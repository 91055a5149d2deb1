"""Sources that need no files: scikit-learn's ``digits`` and a seeded ``synthetic`` set.

Both are always available offline, which makes them the defaults for quick runs and tests.
"""

from __future__ import annotations

import colorsys

import numpy as np

from raytl.data.dataset import DataError, ImageData

SYNTHETIC_SIZE = 32
"""Side of the square images of the ``synthetic`` source."""


def load_digits() -> ImageData:
    """scikit-learn's 1,797 8x8 digits (ships with sklearn: always available offline)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    gray = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return ImageData(
        images=np.repeat(gray[:, :, :, None], 3, axis=3),
        labels=np.asarray(bunch.target, dtype=np.int64),
        class_names=tuple(str(d) for d in range(10)),
        source="digits (scikit-learn)",
    )


def load_synthetic(
    *, seed: int = 0, synthetic_classes: int = 4, synthetic_per_class: int = 60
) -> ImageData:
    """A learnable, seeded 32x32 dataset for fast tests that need no files.

    Each class has its own colour pair, stripe orientation and frequency; each sample gets a
    random phase (a shift), a small rotation, contrast/brightness jitter and pixel noise, so
    no single pixel gives the class away but a small CNN or a linear probe separates them.
    """
    if synthetic_classes < 2:
        raise DataError(f"synthetic_classes must be at least 2, got {synthetic_classes}")
    if synthetic_per_class < 1:
        raise DataError(f"synthetic_per_class must be at least 1, got {synthetic_per_class}")
    k, m, size = synthetic_classes, synthetic_per_class, SYNTHETIC_SIZE
    rng = np.random.default_rng(seed)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((k * m, size, size, 3), dtype=np.uint8)
    for c in range(k):
        hue = c / k
        fg = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255.0
        bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.4, 0.35)) * 255.0
        theta = np.pi * c / k + rng.normal(0.0, 0.08, size=m)
        freq = 2.0 + 1.5 * (c % 3)
        phase = rng.uniform(0.0, 2.0 * np.pi, size=m)
        contrast = rng.uniform(0.6, 1.0, size=m)
        brightness = rng.uniform(-25.0, 25.0, size=m)
        proj = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
        wave = 0.5 + 0.5 * np.sin(2.0 * np.pi * freq * proj + phase[:, None, None])
        wave = wave * contrast[:, None, None]
        pixels = bg + (fg - bg) * wave[..., None] + brightness[:, None, None, None]
        pixels = pixels + rng.normal(0.0, 18.0, size=pixels.shape)
        images[c * m : (c + 1) * m] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return ImageData(
        images=images,
        labels=np.repeat(np.arange(k, dtype=np.int64), m),
        class_names=tuple(f"class_{c}" for c in range(k)),
        source=f"synthetic ({k} classes x {m}, seed {seed})",
    )
