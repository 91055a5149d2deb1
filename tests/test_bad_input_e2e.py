"""A real image folder holding every kind of bad input, end to end through the CLI.

Readable images in every awkward mode (palette, LA, I;16, CMYK, EXIF-rotated, TIFF) must train;
unreadable ones (empty, truncated, not an image, a decompression bomb) are skipped and named, or
with ``data.on_bad_file: error`` stop the search before any training, listed all at once; hidden
and stray files are ignored. Layout problems that make a search meaningless (an empty class, a
single class, a class too small for the folds) are one line each, before Ray starts.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

PER_CLASS = 24
MAX_PIXELS = 50_000


def _digit_images() -> dict[int, list[np.ndarray]]:
    digits = load_digits()
    out: dict[int, list[np.ndarray]] = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        if label < 3 and len(out.setdefault(int(label), [])) < PER_CLASS:
            out[int(label)].append((image * (255 / 16)).astype(np.uint8))
    return out


def _save(pixels: np.ndarray, path: Path, kind: str) -> None:
    """One readable digit, 32x32, written in one of the modes users' folders contain."""
    grey = Image.fromarray(pixels).resize((32, 32), Image.NEAREST)
    if kind == "png-L":
        grey.save(path.with_suffix(".png"))
    elif kind == "png-P":
        grey.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=16).save(
            path.with_suffix(".png")
        )
    elif kind == "png-LA":
        Image.merge("LA", (grey, Image.new("L", grey.size, 255))).save(path.with_suffix(".png"))
    elif kind == "png-I;16":
        wide = np.asarray(grey).astype(np.uint16) * 257
        Image.fromarray(wide).save(path.with_suffix(".png"))  # uint16: mode I;16
    elif kind == "jpeg-CMYK":
        grey.convert("CMYK").save(path.with_suffix(".jpg"), quality=95)
    elif kind == "jpeg-EXIF":
        # stored rotated, with the orientation tag that turns it upright again
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        grey.convert("RGB").rotate(90, expand=True).save(
            path.with_suffix(".jpg"), exif=exif, quality=95
        )
    else:
        grey.save(path.with_suffix(".tif"))


KINDS = ("png-L", "png-P", "png-LA", "png-I;16", "jpeg-CMYK", "jpeg-EXIF", "tiff")


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Three digit classes in every readable mode, plus each kind of unreadable, hidden and stray file."""
    root = tmp_path_factory.mktemp("messy") / "digits"
    for label, images in _digit_images().items():
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True)
        for i, pixels in enumerate(images):
            _save(pixels, folder / f"{i:03d}", KINDS[i % len(KINDS)])
    bad: dict[str, str] = {}
    (root / "digit_1" / "empty.png").write_bytes(b"")
    bad[str(root / "digit_1" / "empty.png")] = "empty file"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    (root / "digit_0" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad[str(root / "digit_0" / "cut.jpg")] = "truncated image"
    (root / "digit_2" / "notes.jpg").write_text("not a picture")
    bad[str(root / "digit_2" / "notes.jpg")] = "not an image"
    Image.new("L", (300, 300), 0).save(root / "digit_1" / "huge.png")
    bad[str(root / "digit_1" / "huge.png")] = (
        f"decompression bomb: 90000 pixels > limit {MAX_PIXELS}"
    )
    # hidden files (ignored silently, even broken) and stray top-level files (ignored, named)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "digit_0" / "._000.png").write_bytes(b"\0\5\26\7AppleDouble")
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.jpg").write_bytes(b"junk")
    (root / "README.txt").write_text("digits 0-2, collected by hand")
    (root / "labels.csv").write_text("file,label\n")
    return root, bad


def _space(tmp_path: Path, root: Path, **data: object) -> Path:
    space = {
        "name": "messy",
        "data": {
            "source": "imagefolder",
            "path": str(root),
            "image_size": 48,
            "test_fraction": 0.2,
            "max_pixels": MAX_PIXELS,
            **data,
        },
        "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
        "scheme": {"kind": "holdout"},
        "search": {
            "num_samples": 2,
            "max_concurrent": 2,
            "max_epochs": 2,
            "scheduler": "fifo",
            "seed": 0,
        },
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "space": {
            "strategy": "linear_probe",
            "head_lr": {"loguniform": [1.0e-2, 3.0e-2]},
            "batch_size": 16,
        },
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _raytl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raytl", *args], capture_output=True, text=True, timeout=timeout
    )


def test_inspect_lists_every_bad_file_with_its_reason(messy):
    root, bad = messy
    run = _raytl("data", "inspect", str(root), "--max-pixels", str(MAX_PIXELS), timeout=120)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    for path, reason in bad.items():
        line = next(line for line in text.splitlines() if path in line)
        assert reason in line, line
    assert (
        f"Total: {3 * PER_CLASS} readable image(s), {len(bad)} unreadable file(s) skipped" in text
    )
    assert "README.txt" in text and "labels.csv" in text  # strays are named as ignored
    assert ".DS_Store" not in text and "._000.png" not in text and "thumb.jpg" not in text


@pytest.mark.slow
def test_search_skips_bad_files_names_them_and_completes(messy, tmp_path):
    root, bad = messy
    out = tmp_path / "out"
    run = _raytl("search", str(_space(tmp_path, root)), "--output", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # one warning, counting and naming every skipped file
    warning = [line for line in run.stderr.splitlines() if "unreadable image file(s)" in line]
    assert len(warning) == 1 and warning[0].split("skipped ")[1].startswith(f"{len(bad)} ")
    skipped = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    assert set(skipped) == set(bad)
    for path, reason in bad.items():
        assert skipped[path].startswith(reason)
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 2 and set(results["status"]) == {"completed"}
    # every readable mode went in: 72 images, of which the search held out a test split
    assert f"{3 * PER_CLASS} images, 3 classes" in run.stdout
    assert (out / "best" / "metrics.json").is_file()


def test_search_with_on_bad_file_error_stops_before_training_with_the_list(messy, tmp_path):
    root, bad = messy
    out = tmp_path / "out"
    run = _raytl(
        "search",
        str(_space(tmp_path, root, on_bad_file="error")),
        "--output",
        str(out),
        timeout=120,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert f"cannot read {len(bad)} image file(s) in {root} (data.on_bad_file: error" in run.stderr
    for path, reason in bad.items():
        assert f"{path}: {reason}" in run.stderr
    # nothing trained: no Ray experiment, no results
    assert not (out / "ray").exists() and not (out / "results.parquet").exists()


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (16, 16), 40 * i % 256).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "counts, scheme, expected",
    [
        ({"cat": 10, "dog": 10, "zebra": 0}, {"kind": "holdout"}, "no image files"),
        ({"cat": 10}, {"kind": "holdout"}, "at least 2 classes"),
        ({"cat": 20, "dog": 20, "eel": 3}, {"kind": "cv", "folds": 5}, "'eel'"),
    ],
)
def test_layout_problems_are_one_line_before_ray(tmp_path, counts, scheme, expected):
    root = _folder(tmp_path / "data", counts)
    space = yaml.safe_load(_space(tmp_path, root).read_text())
    space["scheme"] = scheme
    space["data"]["test_fraction"] = 0.1
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    run = _raytl("search", str(path), "--output", str(tmp_path / "out"), timeout=120)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("raytl: error:")]
    assert len(errors) == 1 and expected in errors[0], run.stderr
    assert "Traceback" not in run.stderr and "ray" not in {
        p.name for p in (tmp_path / "out").glob("*")
    }
