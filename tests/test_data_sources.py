"""Data sources on real files: every image mode, bad files, layouts, built-in sets, Parquet.

All images are written with Pillow into pytest's tmp_path; nothing touches the network.
"""

from __future__ import annotations

import gzip
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytl.data import (
    IMAGE_EXTENSIONS,
    SOURCES,
    DataError,
    ImageData,
    SkippedFile,
    convert_imagefolder,
    inspect_source,
    load_data,
)
from raytl.data.images import UnreadableImage, decode_image
from raytl.data.sources import stratified_subset
from raytl.data.sources.decode import copy_groups
from raytl.data.sources.fashion_mnist import (
    DEFAULT_FASHION_MNIST_PATH,
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    read_idx,
)
from raytl.data.sources.imagefolder import scan_imagefolder
from raytl.data.sources.shards import MANIFEST_NAME

BIG = 10**9
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# --------------------------------------------------------------------------------------------
# helpers that write real image files


def solid(path: Path, colour=(200, 30, 30), size=(24, 16), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)
    return path


def noisy_jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def truncated_jpeg(path: Path) -> Path:
    data = noisy_jpeg_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def decode_file(path: Path, size: int | None = None, max_pixels: int = BIG) -> np.ndarray:
    return decode_image(path.read_bytes(), size=size, max_pixels=max_pixels)


def make_folder(root: Path, per_class: int = 3, classes=("cat", "dog")) -> Path:
    """A small valid image folder with a different colour per class."""
    colours = [(220, 40, 40), (40, 40, 220), (40, 200, 40)]
    for c, name in enumerate(classes):
        for i in range(per_class):
            solid(root / name / f"{i:03d}.png", colours[c % 3], size=(20 + i, 16))
    return root


# --------------------------------------------------------------------------------------------
# every mode to RGB, checked on actual pixel values


def test_rgb_png_pixels_exact(tmp_path):
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = decode_file(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pixels)


def test_grayscale_and_bilevel(tmp_path):
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = decode_file(tmp_path / "g.png")
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 1], gray)
    np.testing.assert_array_equal(out[..., 2], gray)

    Image.fromarray(gray > 128).convert("1").save(tmp_path / "b.png")
    out = decode_file(tmp_path / "b.png")
    assert set(np.unique(out)) <= {0, 255}
    assert tuple(out[1, 1]) == WHITE and tuple(out[0, 0]) == (0, 0, 0)


def test_la_and_rgba_composite_on_white(tmp_path):
    la = Image.new("LA", (4, 2), (255, 0))  # white, fully transparent
    la.putpixel((0, 0), (0, 0))  # black, fully transparent -> still white
    la.putpixel((1, 0), (0, 255))  # black, opaque -> black
    la.putpixel((2, 0), (0, 128))  # black, half transparent -> mid gray
    la.save(tmp_path / "la.png")
    out = decode_file(tmp_path / "la.png")
    assert tuple(out[1, 3]) == WHITE
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert abs(int(out[0, 2, 0]) - 127) <= 1

    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    out = decode_file(tmp_path / "rgba.png")
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == RED


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32896], [0, 1000]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    im.save(tmp_path / "deep.png")
    out = decode_file(tmp_path / "deep.png")
    assert out[0, 0, 0] == 255
    assert out[0, 1, 0] == 128  # 32896 / 257; clipping would give 255
    assert out[1, 0, 0] == 0
    assert out[1, 1, 0] == 4  # round(1000 / 257)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_big_endian_tiff_and_float_tiff(tmp_path):
    im = Image.new("I;16B", (2, 1))
    im.putdata([65535, 32896])
    im.save(tmp_path / "be.tif")
    out = decode_file(tmp_path / "be.tif")
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 128

    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tiff")
    out = decode_file(tmp_path / "f.tiff")
    assert list(out[0, :, 0]) == [0, 128, 255]


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 2), 0)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    for x in range(2, 4):
        for y in range(2):
            p.putpixel((x, y), 1)
    p.save(tmp_path / "opaque.png")
    p.save(tmp_path / "transparent.png", transparency=0)

    out = decode_file(tmp_path / "opaque.png")
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 3]) == RED
    out = decode_file(tmp_path / "transparent.png")
    assert tuple(out[0, 0]) == WHITE  # transparent black index composited on white
    assert tuple(out[0, 3]) == RED


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = decode_file(tmp_path / "cmyk.jpg")
    assert out.shape == (16, 16, 3)
    r, g, b = (int(v) for v in out[8, 8])
    assert r > 240 and g < 15 and b < 15


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (20, 10), RED)
    im.paste(Image.new("RGB", (10, 10), BLUE), (10, 0))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    out = decode_file(tmp_path / "rot.jpg")
    assert out.shape == (20, 10, 3)  # 20 high, 10 wide: rotated
    top, bottom = out[2, 5].astype(int), out[17, 5].astype(int)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_resize_shorter_side_then_center_crop(tmp_path):
    im = Image.new("RGB", (40, 20), RED)
    im.paste(Image.new("RGB", (20, 20), BLUE), (10, 0))  # blue middle half
    im.save(tmp_path / "wide.png")
    out = decode_file(tmp_path / "wide.png", size=16)
    assert out.shape == (16, 16, 3)
    # the crop keeps the middle: columns 10..30 of the original, all blue
    assert tuple(out[8, 8]) == BLUE
    assert out[:, 2:14, 2].min() > 200

    big = decode_file(tmp_path / "wide.png", size=64)  # upscaling works too
    assert big.shape == (64, 64, 3)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_every_mode_resizes_to_the_pixels_of_its_rgb_array(tmp_path, mode):
    """RGB and gray images are resized as decoded (no copy to NumPy first), the others as RGB
    arrays: both give the pixels of resizing the full-size RGB result, bicubic, then cropping."""
    noise = np.random.default_rng(0).integers(0, 256, (30, 47, 4), dtype=np.uint8)
    Image.fromarray(noise, "RGBA").convert(mode).save(tmp_path / "a.png")
    full = decode_file(tmp_path / "a.png")
    for size in (12, 30, 40):
        wide = round(47 * size / 30)
        resized = Image.fromarray(full).resize((wide, size), Image.Resampling.BICUBIC)
        left = (wide - size) // 2
        expected = np.asarray(resized.crop((left, 0, left + size, size)))
        out = decode_file(tmp_path / "a.png", size=size)
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        assert out.flags.writeable  # torch.from_numpy warns about a read-only array
        np.testing.assert_array_equal(out, expected)
    assert full.flags.writeable


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"hello, I am a text file\n", "not an image (cannot identify image file)"),
    ],
)
def test_unreadable_bytes(content, reason):
    with pytest.raises(UnreadableImage) as info:
        decode_image(content, size=None, max_pixels=BIG)
    assert info.value.reason == reason


def test_truncated_jpeg_fails_instead_of_half_decoding(tmp_path):
    path = truncated_jpeg(tmp_path / "t.jpg")
    with pytest.raises(UnreadableImage) as info:
        decode_file(path, size=16)
    assert info.value.reason.startswith("truncated image (OSError: image file is truncated")
    from PIL import ImageFile

    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_decompression_bomb_checked_before_decoding(tmp_path):
    solid(tmp_path / "big.png", size=(100, 100))
    with pytest.raises(UnreadableImage) as info:
        decode_file(tmp_path / "big.png", max_pixels=1000)
    assert info.value.reason == "decompression bomb: 10000 pixels > limit 1000"
    assert decode_file(tmp_path / "big.png", max_pixels=10000).shape == (100, 100, 3)


# --------------------------------------------------------------------------------------------
# imagefolder


def test_imagefolder_layout_extensions_hidden_and_stray(tmp_path):
    root = tmp_path / "data"
    solid(root / "cat" / "a.JPG", (250, 0, 0), fmt="JPEG")
    solid(root / "cat" / "b.Png", (250, 0, 0))
    solid(root / "cat" / "nested" / "deeper" / "c.jpeg", (250, 0, 0), fmt="JPEG")
    solid(root / "cat" / "d.BMP", (250, 0, 0), fmt="BMP")
    solid(root / "dog" / "x.webp", (0, 0, 250), fmt="WEBP")
    solid(root / "dog" / "y.TIFF", (0, 0, 250), fmt="TIFF")
    # hidden: ignored silently, even though broken
    (root / "dog" / ".broken.jpg").write_bytes(b"junk")
    (root / "dog" / ".thumbs").mkdir()
    (root / "dog" / ".thumbs" / "t.jpg").write_bytes(b"junk")
    (root / ".git").mkdir()
    solid(root / ".git" / "z.png")
    # stray and non-image files: used for nothing, but named in a warning
    (root / "README.txt").write_text("my dataset")
    (root / "dog" / "notes.txt").write_text("not an image")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data("imagefolder", path=str(root), image_size=12)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "README.txt" in messages[0] and "notes.txt" in messages[0]
    assert "broken" not in messages[0]

    assert data.class_names == ("cat", "dog")
    assert data.class_counts() == {"cat": 4, "dog": 2}
    assert data.images.shape == (6, 12, 12, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    assert data.skipped == ()
    assert data.source == str(root)
    reds = data.images[data.labels == 0, 6, 6]
    blues = data.images[data.labels == 1, 6, 6]
    assert (reds[:, 0] > 200).all() and (blues[:, 2] > 200).all()


def test_a_folder_scan_is_columnar_and_in_sorted_path_order(tmp_path):
    """The scan keeps its file list as one Arrow string array and a label array (no Python
    object per file) and lists files as sorted ``Path``s do, by path component, sub-folders
    at their place among the files; streamed and in-memory loads see the same files."""
    root = tmp_path / "data"
    names = ["a-b/x.png", "a/b.png", "a/c/d.png", "a.png", "b.png", "a0.png", "A.png", "a/b/e.png"]
    for c, name in enumerate(("cat", "dog")):
        for i, file in enumerate(names):
            solid(root / name / file, (10 * i, 100 * c, 0))
    scan = scan_imagefolder(root)
    assert isinstance(scan.relative, pa.Array) and scan.labels.dtype == np.int64
    assert scan.files == sorted(root / c / n for c in ("cat", "dog") for n in names)
    assert scan.labels.tolist() == [0] * len(names) + [1] * len(names)
    held = load_data("imagefolder", path=str(root), image_size=8)
    streamed = load_data("imagefolder", path=str(root), image_size=8, mode="stream")
    assert np.array_equal(streamed.images[np.arange(len(held))], held.images)
    assert np.array_equal(streamed.labels, held.labels)
    files = streamed.images.rows
    assert [files.path(i) for i in range(len(files))] == [str(f) for f in scan.files]


def test_copy_groups_number_each_file_by_its_first_copy_in_its_class():
    rng = np.random.default_rng(0)
    digests = np.zeros((500, 16), dtype=np.uint8)
    digests[:, 3] = rng.integers(0, 20, 500)  # 20 contents, many copies of each
    labels = rng.integers(0, 3, 500)
    first: dict[tuple[bytes, int], int] = {}
    expected = [
        first.setdefault((bytes(d), int(y)), i)
        for i, (d, y) in enumerate(zip(digests, labels, strict=True))
    ]
    assert copy_groups(digests, labels).tolist() == expected
    assert copy_groups([bytes(d) for d in digests], labels.tolist()).tolist() == expected
    assert copy_groups([], []).tolist() == []


def test_copy_groups_compare_the_whole_digest_among_unique_files():
    """Most files are unique; a few share only the first 8 bytes of their digest (not copies),
    and a few are copies: only the copies share a group."""
    rng = np.random.default_rng(1)
    digests = rng.integers(0, 256, (300, 16), dtype=np.uint8)
    digests[10, :8] = digests[20, :8]  # same first half, different second: not a copy
    digests[40] = digests[30]  # copies, in one class and across two
    digests[50] = digests[30]
    labels = np.zeros(300, dtype=np.int64)
    labels[50] = 1
    expected = np.arange(300)
    expected[40] = 30
    assert copy_groups(digests, labels).tolist() == expected.tolist()
    assert copy_groups(digests[:5], labels[:5]).dtype == np.int32


def test_imagefolder_extensions_constant():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"} == set(IMAGE_EXTENSIONS)


def bad_folder(root: Path) -> dict[str, Path]:
    make_folder(root, per_class=3)
    bad = {
        "truncated": truncated_jpeg(root / "cat" / "trunc.jpg"),
        "empty": root / "dog" / "zero.png",
        "text": root / "dog" / "text.jpg",
    }
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not a JPEG")
    return bad


def test_skip_policy_records_every_bad_file_and_warns_once(tmp_path):
    root = tmp_path / "data"
    bad = bad_folder(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data("imagefolder", path=str(root), image_size=8)
    assert len(data) == 6
    assert data.class_counts() == {"cat": 3, "dog": 3}
    reasons = {s.path: s.reason for s in data.skipped}
    assert reasons[str(bad["empty"])] == "empty file"
    assert reasons[str(bad["text"])] == "not an image (cannot identify image file)"
    assert reasons[str(bad["truncated"])].startswith("truncated image (OSError: ")
    assert len(reasons) == 3
    assert all(isinstance(s, SkippedFile) for s in data.skipped)

    skip_warnings = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skip_warnings) == 1
    assert skip_warnings[0].startswith("skipped 3 unreadable image file(s)")
    assert "cat: 1" in skip_warnings[0] and "dog: 2" in skip_warnings[0]
    for path in bad.values():
        assert str(path) in skip_warnings[0]


def test_error_policy_names_every_bad_file(tmp_path):
    root = tmp_path / "data"
    bad = bad_folder(root)
    with pytest.raises(DataError) as info:
        load_data("imagefolder", path=str(root), image_size=8, on_bad_file="error")
    message = str(info.value)
    assert message.startswith(f"cannot read 3 image file(s) in {root} (data.on_bad_file: error")
    assert f"{bad['truncated']}: truncated image" in message
    assert f"{bad['empty']}: empty file" in message
    assert f"{bad['text']}: not an image" in message


def test_decompression_bomb_limit_in_folder(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    solid(root / "cat" / "huge.png", size=(100, 100))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_data("imagefolder", path=str(root), image_size=8, max_pixels=2000)
    assert [s.path for s in data.skipped] == [str(root / "cat" / "huge.png")]
    assert data.skipped[0].reason == "decompression bomb: 10000 pixels > limit 2000"
    assert len(data) == 6


def test_empty_class_folder_is_named(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    (root / "zebra").mkdir()
    (root / "zebra" / ".DS_Store").write_bytes(b"x")
    (root / "zebra" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        load_data("imagefolder", path=str(root))
    assert str(root / "zebra") in str(info.value)
    assert "no image files" in str(info.value)


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data("imagefolder", path=str(tmp_path / "missing"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_data("imagefolder", path=str(tmp_path / "file.txt"))
    flat = tmp_path / "flat"
    solid(flat / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        load_data("imagefolder", path=str(flat))
    single = tmp_path / "single"
    solid(single / "only" / "a.png")
    with pytest.raises(DataError, match="at least 2 classes"):
        load_data("imagefolder", path=str(single))
    with pytest.raises(DataError, match="needs data.path"):
        load_data("imagefolder")


def test_no_readable_images(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="no readable images"):
        load_data("imagefolder", path=str(root))


def test_class_with_only_bad_files(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    (root / "zebra").mkdir()
    truncated_jpeg(root / "zebra" / "z.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="'zebra' have no readable images"):
            load_data("imagefolder", path=str(root))


def test_many_files_in_parallel_keep_order(tmp_path):
    root = tmp_path / "data"
    for c in range(3):
        for i in range(40):
            value = c * 80 + i
            solid(root / f"c{c}" / f"{i:03d}.png", (value, value, value), size=(10, 10))
    data = load_data("imagefolder", path=str(root), image_size=10)
    assert len(data) == 120
    expected = np.array([c * 80 + i for c in range(3) for i in range(40)], dtype=np.uint8)
    np.testing.assert_array_equal(data.images[:, 5, 5, 0], expected)
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(3), 40))


# --------------------------------------------------------------------------------------------
# built-in sets, subsampling, ImageData


def test_digits_shape_labels_fingerprint():
    a = load_data("digits")
    b = load_data("digits")
    assert a.images.shape == (1797, 8, 8, 3) and a.images.dtype == np.uint8
    assert a.images.max() == 255 and a.images.min() == 0
    assert (a.images[..., 0] == a.images[..., 2]).all()
    assert a.class_names == tuple(str(d) for d in range(10))
    assert set(np.unique(a.labels)) == set(range(10))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16

    changed = a.images.copy()
    changed[0, 0, 0, 0] ^= 1
    c = ImageData(changed, a.labels, a.class_names, a.source)
    assert c.fingerprint != a.fingerprint
    relabelled = ImageData(a.images, a.labels, tuple(f"d{d}" for d in range(10)), a.source)
    assert relabelled.fingerprint != a.fingerprint
    assert a.subset(np.arange(10)).fingerprint != a.fingerprint


def test_synthetic_deterministic_and_balanced():
    a = load_data("synthetic", seed=3, synthetic_classes=5, synthetic_per_class=20)
    b = load_data("synthetic", seed=3, synthetic_classes=5, synthetic_per_class=20)
    c = load_data("synthetic", seed=4, synthetic_classes=5, synthetic_per_class=20)
    assert a.images.shape == (100, 32, 32, 3)
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.images, b.images)
    assert a.fingerprint != c.fingerprint
    assert a.class_counts() == {f"class_{k}": 20 for k in range(5)}
    # not trivially separable by one pixel: the same pixel varies a lot within a class
    assert a.images[a.labels == 0, 16, 16].std(axis=0).max() > 20


def test_synthetic_is_learnable():
    from sklearn.linear_model import LogisticRegression

    train = load_data("synthetic", seed=0, synthetic_classes=4, synthetic_per_class=40)
    test = load_data("synthetic", seed=1, synthetic_classes=4, synthetic_per_class=40)
    model = LogisticRegression(max_iter=500)
    model.fit(train.images.reshape(len(train), -1) / 255.0, train.labels)
    accuracy = model.score(test.images.reshape(len(test), -1) / 255.0, test.labels)
    assert accuracy > 0.9


@pytest.mark.parametrize("source", ["imagefolder", "parquet"])
def test_limit_samples_the_files_before_decoding_any(tmp_path, source):
    """``data.limit`` picks the sample on the labels alone, so only the sampled files are read and
    decoded: what was kept plus what was skipped is exactly the limit (a full decode would have
    met all three broken files), and a clean folder gives the same sample as decoding everything
    and subsampling after."""
    root = make_folder(tmp_path / "folder", per_class=12, classes=("a", "b", "c"))
    for name in ("a", "b", "c"):
        truncated_jpeg(root / name / "zz_broken.jpg")
    if source == "parquet":
        rows = sorted(p for p in root.rglob("*.*"))
        classes = ["a", "b", "c"]
        table = pa.table(
            {
                "image": pa.array([p.read_bytes() for p in rows], pa.binary()),
                "label": pa.array([classes.index(p.parent.name) for p in rows], pa.int64()),
            }
        ).replace_schema_metadata({"class_names": json.dumps(classes)})
        pq.write_table(table, tmp_path / "shard.parquet")
        path = str(tmp_path / "shard.parquet")
    else:
        path = str(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        everything = load_data(source, path=path, image_size=16)
        sampled = load_data(source, path=path, image_size=16, limit=9, seed=3)
    assert len(everything.skipped) == 3
    assert len(sampled) + len(sampled.skipped) == 9

    clean = make_folder(tmp_path / "clean", per_class=12, classes=("a", "b", "c"))
    full = load_data("imagefolder", path=str(clean), image_size=16)
    early = load_data("imagefolder", path=str(clean), image_size=16, limit=9, seed=3)
    late = stratified_subset(full, 9, seed=3)
    assert early.fingerprint == late.fingerprint and early.class_counts() == {
        "a": 3,
        "b": 3,
        "c": 3,
    }


def test_stratified_limit():
    full = load_data("digits")
    a = load_data("digits", limit=100, seed=0)
    b = load_data("digits", limit=100, seed=0)
    c = load_data("digits", limit=100, seed=1)
    assert len(a) == 100
    assert a.class_counts() == {str(d): 10 for d in range(10)}
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.class_names == full.class_names

    synth = load_data("synthetic", limit=40, synthetic_classes=4, synthetic_per_class=60)
    assert synth.class_counts() == {f"class_{k}": 10 for k in range(4)}
    assert (np.diff(synth.labels) >= 0).all()  # original (class) order kept

    assert load_data("digits", limit=5000).fingerprint == full.fingerprint
    assert len(load_data("digits", limit=1795)) == 1795
    with pytest.raises(DataError, match="smaller than the number of classes"):
        load_data("digits", limit=5)
    with pytest.raises(DataError, match="limit must be a positive integer"):
        load_data("digits", limit=0)


def test_arrow_round_trip():
    data = load_data("synthetic", synthetic_classes=3, synthetic_per_class=7)
    table = data.to_arrow()
    assert table.column_names == ["image", "label"]
    assert table.schema.field("image").type == pa.binary(32 * 32 * 3)
    meta = table.schema.metadata
    assert json.loads(meta[b"class_names"]) == list(data.class_names)
    assert meta[b"height"] == b"32" and meta[b"width"] == b"32"
    assert meta[b"fingerprint"].decode() == data.fingerprint

    back = ImageData.from_arrow(table, source="copy")
    np.testing.assert_array_equal(back.images, data.images)
    np.testing.assert_array_equal(back.labels, data.labels)
    assert back.class_names == data.class_names and back.fingerprint == data.fingerprint

    chunked = pa.concat_tables([table.slice(0, 5), table.slice(5)])
    assert ImageData.from_arrow(chunked, source="chunks").fingerprint == data.fingerprint

    tampered = table.set_column(1, "label", pa.array(np.zeros(len(data), dtype=np.int64)))
    tampered = tampered.replace_schema_metadata(table.schema.metadata)
    with pytest.raises(DataError, match="fingerprint"):
        ImageData.from_arrow(tampered, source="tampered")


def test_image_data_validation():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1])
    ok = ImageData(images, labels, ("a", "b"), "test")
    assert ok.labels.dtype == np.int64 and len(ok) == 2
    with pytest.raises(DataError, match="uint8"):
        ImageData(images.astype(np.float32), labels, ("a", "b"), "test")
    with pytest.raises(DataError, match=r"\(N, H, W, 3\)"):
        ImageData(np.zeros((2, 4, 4), dtype=np.uint8), labels, ("a", "b"), "test")
    with pytest.raises(DataError, match="labels must be in"):
        ImageData(images, np.array([0, 2]), ("a", "b"), "test")
    with pytest.raises(DataError, match="2 images but 3 labels"):
        ImageData(images, np.array([0, 1, 1]), ("a", "b"), "test")


def test_image_data_groups_of_byte_identical_files():
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    labels = np.array([0, 1, 0, 1])
    alone = ImageData(images, labels, ("a", "b"), "test")
    np.testing.assert_array_equal(alone.groups, [0, 1, 2, 3])
    assert alone.duplicates == 0
    paired = ImageData(images, labels, ("a", "b"), "test", groups=np.array([0, 1, 0, 3]))
    assert paired.duplicates == 1
    assert paired.fingerprint != alone.fingerprint  # the groups decide the splits
    np.testing.assert_array_equal(paired.subset(np.array([2, 3])).groups, [0, 3])
    assert paired.subset(np.array([0, 2])).duplicates == 1
    assert ImageData(images, labels, ("a", "b"), "test", groups=np.arange(4)).fingerprint == (
        alone.fingerprint
    )
    table = paired.to_arrow()
    assert table.column_names == ["image", "label", "group"]
    back = ImageData.from_arrow(table, source="copy")
    np.testing.assert_array_equal(back.groups, paired.groups)
    assert back.fingerprint == paired.fingerprint
    with pytest.raises(DataError, match="groups must be a 1-D integer array"):
        ImageData(images, labels, ("a", "b"), "test", groups=np.array([0, 1]))


def test_loaders_group_byte_identical_files(tmp_path):
    src = make_folder(tmp_path / "folder", per_class=3)
    first = (src / "cat" / "000.png").read_bytes()
    (src / "cat" / "copy.png").write_bytes(first)
    (src / "dog" / "copy.png").write_bytes(first)
    folder = load_data("imagefolder", path=str(src), image_size=8)
    assert folder.duplicates == 1
    # cat: 000, 001, 002, copy; dog: 000, 001, 002, copy: the copy in cat shares file 0's group;
    # the one filed under dog is a labelling question, not a split one, and keeps its own group
    np.testing.assert_array_equal(folder.groups, [0, 1, 2, 0, 4, 5, 6, 7])
    convert_imagefolder(str(src), str(tmp_path / "shards"), shuffle_seed=None)  # folder order
    shards = load_data("parquet", path=str(tmp_path / "shards"), image_size=8)
    np.testing.assert_array_equal(shards.groups, folder.groups)
    assert shards.fingerprint == folder.fingerprint


def test_unknown_source_lists_valid_ones():
    with pytest.raises(DataError) as info:
        load_data("cifar-11")
    for name in SOURCES:
        assert name in str(info.value)
    assert set(SOURCES) == {"imagefolder", "parquet", "fashion-mnist", "digits", "synthetic"}


def test_path_for_builtin_source_warns(tmp_path):
    with pytest.warns(UserWarning, match="takes no path"):
        load_data("digits", path=str(tmp_path))


# --------------------------------------------------------------------------------------------
# fashion-mnist and the IDX parser


def test_fashion_mnist_from_debian_package():
    if not Path(DEFAULT_FASHION_MNIST_PATH, "train-images-idx3-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    data = load_data("fashion-mnist")
    assert data.images.shape == (70000, 28, 28, 3)
    assert data.class_names == FASHION_MNIST_CLASSES
    assert data.class_counts() == {name: 7000 for name in FASHION_MNIST_CLASSES}
    assert (data.images[:50, ..., 0] == data.images[:50, ..., 1]).all()


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def test_idx_parser_gzipped_and_plain(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    for gz in (True, False):
        path = write_idx(tmp_path / f"x-{gz}-idx3-ubyte", array, gz=gz)
        np.testing.assert_array_equal(read_idx(path), array)

    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(tmp_path / "bad")
    short = write_idx(tmp_path / "short", array, gz=False)
    short.write_bytes(short.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(short)


def test_fashion_mnist_loader_on_small_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    train_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    train_y = np.array([0, 1, 2, 9, 9], dtype=np.uint8)
    test_y = np.array([3, 4, 5], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", train_x, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", train_y, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x, gz=False)  # un-gzipped names work
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, gz=False)

    data = load_fashion_mnist(path=str(tmp_path))
    assert data.images.shape == (8, 28, 28, 3)
    np.testing.assert_array_equal(data.images[:5, ..., 1], train_x)
    np.testing.assert_array_equal(data.images[5:, ..., 0], test_x)
    np.testing.assert_array_equal(data.labels, [0, 1, 2, 9, 9, 3, 4, 5])
    assert load_data("fashion-mnist", path=str(tmp_path), limit=10).fingerprint == data.fingerprint


def test_fashion_mnist_float_labels_are_refused_not_truncated(tmp_path):
    """IDX labels stored as floats were cast to int: 2.7 became class 2, silently."""
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)), gz=False)
    labels = np.array([0.0, 1.0, 2.7], dtype=">f4")  # IDX type 0x0D: big-endian float32
    header = bytes([0, 0, 0x0D, 1]) + np.array([3], dtype=">u4").tobytes()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28)), gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(1), gz=False)
    with pytest.raises(
        DataError, match="train-labels-idx1-ubyte: expected integer labels, got float32"
    ):
        load_fashion_mnist(path=str(tmp_path))


def test_fashion_mnist_missing_files_explain_the_fix(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 28, 28)), gz=True)
    with pytest.raises(DataError) as info:
        load_data("fashion-mnist", path=str(tmp_path))
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert "train-images" not in message.split("lacks")[1].split(".")[0]
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.path" in message and "data.download" in message


# --------------------------------------------------------------------------------------------
# parquet


def test_parquet_round_trip_via_convert(tmp_path):
    src = tmp_path / "folder"
    make_folder(src, per_class=4, classes=("ant", "bee", "cow"))
    solid(src / "bee" / "photo.JPG", (10, 200, 10), size=(50, 30), fmt="JPEG")
    bad = truncated_jpeg(src / "cow" / "broken.jpg")
    out = tmp_path / "shards"

    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        paths = convert_imagefolder(str(src), str(out), shard_size=5, shuffle_seed=None)
    assert [Path(p).name for p in paths] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME, "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    )  # no temporary files left behind
    shard = pq.read_table(paths[0])
    assert shard.schema.field("image").type == pa.binary()
    assert shard.schema.field("label").type == pa.int64()
    assert shard.column("path")[0].as_py() == "ant/000.png"
    assert shard.column("image")[0].as_py() == (src / "ant" / "000.png").read_bytes()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["rows"] == 13 and manifest["skipped"][0]["path"] == str(bad)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = load_data("imagefolder", path=str(src), image_size=16)
    shards = load_data("parquet", path=str(out), image_size=16)
    assert shards.class_names == folder.class_names == ("ant", "bee", "cow")
    np.testing.assert_array_equal(shards.labels, folder.labels)
    np.testing.assert_array_equal(shards.images, folder.images)
    assert shards.fingerprint == folder.fingerprint
    assert shards.skipped == ()

    single = load_data("parquet", path=paths[0], image_size=16)
    assert len(single) == 5

    with pytest.raises(DataError, match="already holds"):
        convert_imagefolder(str(src), str(out))


def test_parquet_detects_unfinished_conversion(tmp_path):
    src = make_folder(tmp_path / "folder")
    out = tmp_path / "shards"
    convert_imagefolder(str(src), str(out), shard_size=2)
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(DataError, match="did not finish"):
        load_data("parquet", path=str(out))


def write_shard(path: Path, columns: dict, metadata: dict | None) -> Path:
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def test_parquet_missing_column_or_metadata(tmp_path):
    good_image = (make_folder(tmp_path / "f", per_class=1) / "cat" / "000.png").read_bytes()
    meta = {"class_names": json.dumps(["cat", "dog"])}

    no_label = tmp_path / "no_label"
    no_label.mkdir()
    shard = write_shard(no_label / "a.parquet", {"image": [good_image]}, meta)
    with pytest.raises(DataError) as info:
        load_data("parquet", path=str(no_label))
    assert str(shard) in str(info.value) and "'label'" in str(info.value)

    no_meta = tmp_path / "no_meta"
    no_meta.mkdir()
    shard = write_shard(
        no_meta / "a.parquet", {"image": [good_image], "label": pa.array([0], pa.int64())}, None
    )
    with pytest.raises(DataError) as info:
        load_data("parquet", path=str(no_meta))
    assert str(shard) in str(info.value) and "class_names" in str(info.value)

    with pytest.raises(DataError, match="no \\*.parquet files"):
        load_data("parquet", path=str(tmp_path / "f"))


def test_parquet_bad_rows_are_named_by_shard_and_row(tmp_path):
    folder = make_folder(tmp_path / "f", per_class=1)
    cat = (folder / "cat" / "000.png").read_bytes()
    dog = (folder / "dog" / "000.png").read_bytes()
    meta = {"class_names": json.dumps(["cat", "dog"])}
    shards = tmp_path / "shards"
    shards.mkdir()
    columns = {
        "image": pa.array([cat, b"garbage", dog, b""], pa.binary()),
        "label": pa.array([0, 1, 1, 0], pa.int64()),
    }
    shard = write_shard(shards / "s.parquet", columns, meta)
    with pytest.warns(UserWarning, match="skipped 2"):
        data = load_data("parquet", path=str(shards), image_size=8)
    assert len(data) == 2
    assert [(s.path, s.reason) for s in data.skipped] == [
        (f"{shard}#row=1", "not an image (cannot identify image file)"),
        (f"{shard}#row=3", "empty file"),
    ]
    with pytest.raises(DataError, match=r"s.parquet#row=1"):
        load_data("parquet", path=str(shards), on_bad_file="error")

    bad_label = tmp_path / "bad_label"
    bad_label.mkdir()
    columns = {"image": pa.array([cat, dog], pa.binary()), "label": pa.array([0, 7], pa.int64())}
    write_shard(bad_label / "s.parquet", columns, meta)
    with pytest.raises(DataError, match=r"s.parquet#row=1: label 7 is outside"):
        load_data("parquet", path=str(bad_label))


def test_a_damaged_page_in_a_shard_is_one_line_naming_it(tmp_path):
    """A corrupt data page (the footer still reads) once surfaced as a raw OSError
    ("Corrupt snappy compressed data") from search and data inspect."""
    src = make_folder(tmp_path / "folder", per_class=6)
    convert_imagefolder(str(src), str(tmp_path / "shards"), shard_size=100)
    shard = sorted((tmp_path / "shards").glob("*.parquet"))[0]
    import pyarrow.parquet as pq

    page = pq.ParquetFile(shard).metadata.row_group(0).column(0).data_page_offset
    damaged = bytearray(shard.read_bytes())
    damaged[page : page + 16] = b"\x13" * 16  # the first page's header; the footer stays intact
    shard.write_bytes(bytes(damaged))
    for attempt in (
        lambda: load_data("parquet", path=str(tmp_path / "shards"), image_size=8),
        lambda: inspect_source("parquet", path=str(tmp_path / "shards")),
    ):
        with pytest.raises(DataError, match=rf"{shard.name}: a data page cannot be read"):
            attempt()


def test_convert_keeps_a_file_whose_name_is_not_utf8(tmp_path):
    """A Latin-1 file name once broke `data convert` (UnicodeEncodeError from pyarrow)."""
    import os

    src = make_folder(tmp_path / "folder", per_class=3)
    odd = os.fsdecode(bytes(src / "cat") + b"/caf\xe9.png")
    Image.new("RGB", (8, 8), (250, 10, 10)).save(odd)
    shards = convert_imagefolder(str(src), str(tmp_path / "shards"))
    paths = [p for s in shards for p in pq.read_table(s).column("path").to_pylist()]
    assert "cat/caf\\xe9.png" in paths  # the byte shown, nothing lost or replaced by "?"
    assert len(load_data("parquet", path=str(tmp_path / "shards"), image_size=8)) == 7
