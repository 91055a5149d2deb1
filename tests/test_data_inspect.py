"""inspect_source on real files: every unreadable file is listed with its reason, per class."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytl.data import DataError, inspect_source


def png(path: Path, size=(20, 10), colour=(10, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.fixture
def messy_folder(tmp_path: Path) -> tuple[Path, dict[Path, str]]:
    """Three classes: 'ant' clean, 'bee' with two bad files, 'cow' with one; one huge image."""
    root = tmp_path / "data"
    for i in range(4):
        png(root / "ant" / f"{i}.png")
    for i in range(3):
        png(root / "bee" / f"{i}.PNG")
    png(root / "cow" / "ok.png", size=(30, 40))
    bad = {
        truncated_jpeg(
            root / "bee" / "cut.jpg"
        ): "truncated image (OSError: image file is truncated",
        root / "bee" / "nested" / "text.jpeg": "not an image (cannot identify image file)",
        root / "cow" / "zero.jpg": "empty file",
        png(
            root / "cow" / "huge.png", size=(100, 100)
        ): "decompression bomb: 10000 pixels > limit 5000",
    }
    (root / "bee" / "nested").mkdir()
    (root / "bee" / "nested" / "text.jpeg").write_text("hello")
    (root / "cow" / "zero.jpg").write_bytes(b"")
    (root / "notes.md").write_text("stray")
    return root, bad


def test_inspect_lists_every_bad_file_with_reason(messy_folder):
    root, bad = messy_folder
    report = inspect_source("imagefolder", path=str(root), max_pixels=5000)

    assert report.class_counts == {"ant": 4, "bee": 3, "cow": 1}
    assert report.total == 8
    assert report.skipped_per_class == {"bee": 2, "cow": 2}
    reasons = {s.path: s.reason for s in report.skipped}
    assert set(reasons) == {str(p) for p in bad}
    for path, reason in bad.items():
        assert reasons[str(path)].startswith(reason)
    assert report.image_shape is None  # sizes vary
    assert report.size_range == ((10, 20), (40, 30))
    assert report.ignored == [str(root / "notes.md")]
    assert report.problems == []

    text = report.format()
    for path in bad:
        assert str(path) in text
    assert "decompression bomb: 10000 pixels > limit 5000" in text
    assert "Total: 8 readable image(s), 4 unreadable file(s) skipped" in text
    lines = text.splitlines()
    assert any(line.split()[:3] == ["ant", "4", "image(s)"] for line in lines)
    bee = next(line for line in lines if line.strip().startswith("bee"))
    assert "3 image(s)" in bee and "2 unreadable" in bee
    assert "notes.md" in text


def test_inspect_reports_layout_problems_instead_of_stopping(tmp_path):
    root = tmp_path / "data"
    png(root / "ant" / "a.png")
    (root / "empty").mkdir()
    truncated_jpeg(root / "broken" / "b.jpg")
    report = inspect_source("imagefolder", path=str(root))
    assert report.class_counts == {"ant": 1, "broken": 0, "empty": 0}
    assert report.image_shape == (10, 20, 3)
    assert "class 'broken' has no readable images" in report.problems
    assert "class 'empty' has no readable images" in report.problems
    assert "Problems:" in report.format()

    with pytest.raises(DataError, match="does not exist"):
        inspect_source("imagefolder", path=str(tmp_path / "nope"))


def test_inspect_parquet_and_builtin(tmp_path):
    good = png(tmp_path / "g.png").read_bytes()
    table = pa.table(
        {
            "image": pa.array([good, b"junk", good], pa.binary()),
            "label": pa.array([0, 1, 1], pa.int64()),
        }
    ).replace_schema_metadata({"class_names": json.dumps(["x", "y"])})
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table, shards / "part-00000.parquet")
    report = inspect_source("parquet", path=str(shards))
    assert report.class_counts == {"x": 1, "y": 1}
    assert [s.path for s in report.skipped] == [f"{shards / 'part-00000.parquet'}#row=1"]
    assert report.skipped_per_class == {"y": 1}

    digits = inspect_source("digits")
    assert digits.total == 1797 and digits.image_shape == (8, 8, 3)
    assert sum(digits.class_counts.values()) == 1797
    assert "Image shape: 8x8x3" in digits.format()

    with pytest.raises(DataError, match="valid sources"):
        inspect_source("nonsense")


def test_inspect_counts_and_lists_byte_identical_copies(tmp_path):
    root = tmp_path / "data"
    ant = png(root / "ant" / "a.png", colour=(1, 2, 3))
    png(root / "ant" / "b.png", colour=(4, 5, 6))
    png(root / "bee" / "c.png", colour=(7, 8, 9))
    for copy in (root / "ant" / "a_copy.png", root / "bee" / "stolen.png"):
        copy.write_bytes(ant.read_bytes())
    report = inspect_source("imagefolder", path=str(root))
    assert report.total == 5 and report.duplicates == 2
    assert report.duplicate_files == [
        (str(root / "ant" / "a_copy.png"), str(ant)),
        (str(root / "bee" / "stolen.png"), str(ant)),
    ]
    text = report.format()
    assert "Duplicates: 2 file(s) byte-identical to another file" in text
    assert f"  {root / 'bee' / 'stolen.png'} = {ant}" in text

    clean = tmp_path / "clean"
    png(clean / "x" / "1.png", colour=(1, 1, 1))
    png(clean / "y" / "1.png", colour=(2, 2, 2))
    assert "Duplicates: 0 file(s)" in inspect_source("imagefolder", path=str(clean)).format()
    digits = inspect_source("digits")  # built-in sets are not files: not checked
    assert digits.duplicates is None and "Duplicates" not in digits.format()


def test_inspect_counts_copies_in_parquet_shards(tmp_path):
    one = png(tmp_path / "one.png", colour=(1, 2, 3)).read_bytes()
    two = png(tmp_path / "two.png", colour=(3, 2, 1)).read_bytes()
    table = pa.table(
        {
            "image": pa.array([one, two, one, one], pa.binary()),
            "label": pa.array([0, 1, 1, 0], pa.int64()),
        }
    ).replace_schema_metadata({"class_names": json.dumps(["x", "y"])})
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table, shards / "part-00000.parquet")
    report = inspect_source("parquet", path=str(shards))
    assert report.duplicates == 2
    assert [copy for copy, _ in report.duplicate_files] == [
        f"{shards / 'part-00000.parquet'}#row=2",
        f"{shards / 'part-00000.parquet'}#row=3",
    ]
