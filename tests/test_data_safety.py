"""The data loaders stay safe on hostile input (review issue 14, findings 5 and 6).

Memory is bounded while decoding (a lower default pixel limit, a budget of pixels decoded at
once across threads, alpha blending without widening), only raster formats reach Pillow, and
links never take the loaders outside the data folder. Every file is real, under tmp_path.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

import raytl.data.images as images_module
import raytl.data.sources.decode as decode_module
from raytl.config import DataConfig
from raytl.data import DataError, inspect_source, load_data
from raytl.data.budget import PixelBudget
from raytl.data.images import DEFAULT_MAX_PIXELS, UnreadableImage, decode_image
from raytl.data.sources.imagefolder import scan_imagefolder

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n%%EOF\n"
BIG_RGBA_SIDE = 4096  # 16.8 megapixels
MEMORY_BOUND_MIB = 300


def png(path: Path, colour=(200, 30, 30), size=(24, 16), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, "PNG")
    return path


def two_classes(root: Path, per_class: int = 3) -> Path:
    for c, (name, colour) in enumerate((("cat", (220, 40, 40)), ("dog", (40, 40, 220)))):
        for i in range(per_class):
            png(root / name / f"{i:03d}.png", colour, size=(20 + i + 5 * c, 16))
    return root


# --------------------------------------------------------------------------------------------
# finding 5: formats, the pixel limit, memory while decoding, the budget across threads


def test_eps_bytes_named_jpg_never_reach_the_eps_plugin(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    with pytest.raises(UnreadableImage) as info:
        decode_image(EPS, size=16, max_pixels=DEFAULT_MAX_PIXELS)
    assert info.value.reason.startswith("unsupported image format EPS (raytl decodes JPEG, PNG")
    assert opened == []

    root = two_classes(tmp_path / "data")
    (root / "cat" / "vector.jpg").write_bytes(EPS)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    (root / "dog" / "anim.png").write_bytes(gif.getvalue())
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        data = load_data("imagefolder", path=str(root), image_size=8)
    reasons = {Path(s.path).name: s.reason for s in data.skipped}
    assert reasons["vector.jpg"].startswith("unsupported image format EPS")
    assert reasons["anim.png"].startswith("unsupported image format GIF")
    assert len(data) == 6 and opened == []


def test_default_pixel_limit_is_40_megapixels(tmp_path):
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert DataConfig().max_pixels == DEFAULT_MAX_PIXELS
    path = png(tmp_path / "wide.png", 0, size=(8000, 5001), mode="L")  # 40,008,000 pixels
    with pytest.raises(UnreadableImage) as info:
        decode_image(path.read_bytes(), size=8, max_pixels=DEFAULT_MAX_PIXELS)
    assert info.value.reason == "decompression bomb: 40008000 pixels > limit 40000000"


def test_composite_on_white_is_exact_for_every_colour_and_alpha(tmp_path):
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, 255 - c, c // 2, a], axis=-1).astype(np.uint8)  # 256x256 pixels
    path = tmp_path / "all.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = rgba[..., :3].astype(np.int64)
    alpha = rgba[..., 3:].astype(np.int64)
    expected = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    np.testing.assert_array_equal(
        decode_image(path.read_bytes(), size=None, max_pixels=10**6), expected
    )


PEAK_SCRIPT = """
import sys
from raytl.data.images import decode_image

def kib(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))

data = open(sys.argv[1], "rb").read()
try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak (VmHWM) restarts from the current size (VmRSS)
    before = kib("VmRSS")
except OSError:  # no reset allowed: measure from the peak so far (a lower bound)
    before = kib("VmHWM")
rgb = decode_image(data, size=None, max_pixels=10**8)
assert rgb.shape == ({side}, {side}, 3) and tuple(rgb[0, 0]) == (255, 127, 127), rgb[0, 0]
print((kib("VmHWM") - before) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_big_rgba_png_decodes_within_a_small_multiple_of_its_pixels(tmp_path):
    """A 16.8-megapixel, 70 KB RGBA PNG: 64 MiB of RGBA, 48 MiB of RGB; the peak while decoding
    (measured in a fresh process) stays under MEMORY_BOUND_MIB (734 MiB before the fix)."""
    path = tmp_path / "big.png"
    Image.new("RGBA", (BIG_RGBA_SIDE, BIG_RGBA_SIDE), (255, 0, 0, 128)).save(path)
    assert path.stat().st_size < 200_000
    script = PEAK_SCRIPT.format(side=BIG_RGBA_SIDE)
    run = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    peak_mib = int(run.stdout.split()[-1])
    assert peak_mib < MEMORY_BOUND_MIB, f"decoding peaked {peak_mib} MiB above the baseline"


def test_pixel_budget_blocks_until_others_finish_and_lets_a_big_image_run_alone():
    budget = PixelBudget(100)
    events: list[str] = []
    with budget.reserve(60):
        waiter = threading.Thread(target=lambda: _hold(budget, 50, events))
        waiter.start()
        time.sleep(0.2)
        assert events == [] and budget.in_use == 60  # 60 + 50 > 100: it waits
        events.append("released")
    waiter.join(5)
    assert events == ["released", "got 50"]
    with budget.reserve(250):  # larger than the whole budget: runs, alone
        assert budget.in_use == 250
    assert budget.in_use == 0
    with pytest.raises(ValueError):
        PixelBudget(0)


def _hold(budget: PixelBudget, pixels: int, events: list[str]) -> None:
    with budget.reserve(pixels):
        events.append(f"got {pixels}")


def test_decoding_threads_respect_the_pixel_budget(tmp_path, monkeypatch):
    """Five 1-megapixel images, one of 3 megapixels, a budget of 2.5 megapixels: never more
    than two small ones at once, and the big one alone."""
    root = tmp_path / "data"
    for i in range(5):
        png(root / ("cat" if i % 2 else "dog") / f"{i}.png", (i, 0, 0), size=(1000, 1000))
    png(root / "cat" / "big.png", (9, 0, 0), size=(2000, 1500))
    in_flight: list[int] = []
    peaks: list[list[int]] = []
    lock = threading.Lock()
    original = images_module._load_oriented

    def counting(im):  # runs while the image's pixels are reserved: the decoding step
        pixels = im.size[0] * im.size[1]
        with lock:
            in_flight.append(pixels)
            peaks.append(list(in_flight))
        time.sleep(0.15)  # long enough for every thread that is allowed in to overlap
        try:
            return original(im)
        finally:
            with lock:
                in_flight.remove(pixels)

    monkeypatch.setattr(images_module, "_load_oriented", counting)
    monkeypatch.setattr(decode_module, "DECODE_BUDGET", PixelBudget(2_500_000))
    data = load_data("imagefolder", path=str(root), image_size=8)
    assert len(data) == 6 and in_flight == []
    assert max(sum(p) for p in peaks) <= 3_000_000
    assert all(sum(p) <= 2_500_000 for p in peaks if 3_000_000 not in p)
    assert [3_000_000] in peaks  # the big one ran, alone
    assert [1_000_000, 1_000_000] in peaks  # two small ones did run side by side


# --------------------------------------------------------------------------------------------
# finding 6: links stay inside the data folder


@pytest.fixture
def linked_folder(tmp_path: Path) -> Path:
    """cat/ and dog/ with real images, and links of every kind that leave or loop."""
    root = two_classes(tmp_path / "data")
    outside = tmp_path / "outside"
    png(outside / "secret.png", (1, 2, 3))
    png(outside / "more" / "x.png", (4, 5, 6))
    host = tmp_path / "hostname"
    host.write_text("myhost\n")
    os.symlink(host, root / "cat" / "host.jpg")  # a non-image outside, named like an image
    os.symlink(outside / "secret.png", root / "cat" / "secret.png")  # an image outside
    os.symlink(outside, root / "dog" / "elsewhere")  # a folder outside
    os.symlink(tmp_path, root / "dog" / "up")  # the folder that holds the data folder
    os.symlink(root / "cat", root / "cat" / "loop")  # a cycle
    png(root / "dog" / "shared" / "s.png", (7, 8, 9))
    os.symlink(root / "dog" / "shared", root / "cat" / "alias")  # one real folder, two classes
    return root


def test_links_outside_the_folder_are_skipped_with_the_reason(linked_folder):
    root = linked_folder
    real_root = os.path.realpath(root)
    above = os.path.realpath(root.parent)
    with pytest.warns(UserWarning, match="skipped 6 unreadable"):
        data = load_data("imagefolder", path=str(root), image_size=8)
    assert data.class_counts() == {"cat": 3, "dog": 4}
    reasons = {os.path.relpath(s.path, root): s.reason for s in data.skipped}
    assert reasons == {
        "cat/host.jpg": f"links outside the data folder (to {above}/hostname); not used",
        "cat/secret.png": f"links outside the data folder (to {above}/outside/secret.png); not used",
        "dog/elsewhere": f"folder links outside the data folder (to {above}/outside); not used",
        "dog/up": f"folder links outside the data folder (to {above}); not used",
        "cat/loop": f"folder link loops back to {real_root}/cat (a cycle); not used",
        "cat/alias/s.png": (
            f"the same file as {root}/dog/shared/s.png (class 'dog'), "
            "reached again from class 'cat'; not used"
        ),
    }
    scan = scan_imagefolder(root)
    assert all(os.path.realpath(f).startswith(real_root + os.sep) for f in scan.files)
    assert len({os.path.realpath(f) for f in scan.files}) == len(scan.files)


def test_inspect_lists_refused_links_per_class(linked_folder):
    report = inspect_source("imagefolder", path=str(linked_folder))
    assert report.class_counts == {"cat": 3, "dog": 4}
    assert report.skipped_per_class == {"cat": 4, "dog": 2}
    assert "links outside the data folder" in report.format()


def test_a_class_folder_linking_outside_is_not_walked(tmp_path):
    root = two_classes(tmp_path / "data")
    png(tmp_path / "elsewhere" / "a.png")
    os.symlink(tmp_path / "elsewhere", root / "zebra")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="'zebra' have no readable images") as info:
            load_data("imagefolder", path=str(root), image_size=8)
    assert "folder links outside the data folder" in str(info.value)
