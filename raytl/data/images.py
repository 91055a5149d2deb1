"""Decode one encoded image (file bytes) into an RGB ``uint8`` array.

Every source that reads encoded files (image folders, Parquet shards) goes through
:func:`decode_image`, so the same bytes always give the same pixels whatever the source,
and every Pillow pitfall is handled in one place: only raster formats reach Pillow's plugins
(:data:`IMAGE_FORMATS`), decompression bombs are refused before decoding, truncated files fail
instead of being half-decoded, EXIF orientation is applied, and every image mode (16-bit,
palette, alpha, CMYK, float) is mapped to RGB the same way, a band of rows at a time, so the
memory a decode takes stays a small multiple of the image's own.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raytl.data.budget import PixelBudget

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
"""File suffixes treated as images (compared lower-cased, so ``.JPG`` counts)."""

IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
"""The Pillow formats raytl decodes (JPEG includes cameras' multi-picture MPO files, which
Pillow's JPEG plugin opens). Bytes in any other format are refused whatever the file is named,
so no other Pillow plugin (EPS, which runs Ghostscript, among them) ever sees them."""

DEFAULT_MAX_PIXELS = 40_000_000
"""40 megapixels: larger images are refused as decompression bombs, before decoding.

Decoding takes a small multiple of an image's pixels in bytes: measured, 8.5 bytes a pixel for
an RGBA PNG, 10 for RGB, 12 for gray+alpha, 6 for 16-bit gray (the decoded image, its RGB
result, and bands of a few MB in between), so one image at this limit peaks near 500 MB.
``data.max_pixels`` and ``raytl data inspect --max-pixels`` override it;
:data:`DECODE_PIXEL_BUDGET` bounds the pixels decoded at once by all threads together."""

DECODE_PIXEL_BUDGET = 2 * DEFAULT_MAX_PIXELS
"""Pixels decoded at once by all decoding threads together (see :class:`PixelBudget`): about
1 GB at the rates above, whatever the number of threads; a bigger image decodes alone."""

_TIFF_BITS_PER_SAMPLE = 258
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_BAND_PIXELS = 1 << 20
"""Pixels converted per band of rows (alpha blending, 16-bit and float scaling)."""


class UnreadableImage(Exception):
    """An image that cannot be decoded; ``reason`` is the short text a SkippedFile records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_image_path(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def decode_image(
    data: bytes, *, size: int | None, max_pixels: int, budget: PixelBudget | None = None
) -> np.ndarray:
    """Decode encoded image bytes to an RGB array, optionally resized and center-cropped.

    Args:
        data: The encoded file content (JPEG, PNG, BMP, WEBP or TIFF: :data:`IMAGE_FORMATS`).
        size: If given, the shorter side is resized to ``size`` (bicubic, antialiased) and
            the center ``size x size`` square is kept, so images of any shape stack together.
        max_pixels: Images with more pixels are refused before any pixel is decoded.
        budget: If given, the image's pixels are reserved from it while decoding, waiting
            until they fit beside the images other threads are decoding.

    Returns:
        A C-contiguous, writable ``uint8`` array of shape ``(H, W, 3)``.

    Raises:
        UnreadableImage: The bytes are empty, not an image, in a format raytl does not
            decode, truncated, corrupt, or too large.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not data:
        raise UnreadableImage("empty file")
    im = _open_checked(data, max_pixels=max_pixels, draft_size=size)
    width, height = im.size  # after JPEG draft mode: the pixels that will be decoded
    with budget.reserve(width * height) if budget is not None else nullcontext():
        im = _load_oriented(im)  # rebound, so the file's own copy of the pixels is freed
        return _rgb_pixels(im, size)


def check_image(data: bytes, *, max_pixels: int) -> None:
    """The checks a streamed image gets when its index is built, without decoding its pixels:
    a format raytl decodes, within ``max_pixels``, not truncated (a JPEG ends with its end
    marker; Pillow's ``verify`` walks a PNG's chunks and their checksums).

    Raises:
        UnreadableImage: As :func:`decode_image` would, for what can be seen without decoding.
    """
    if not data:
        raise UnreadableImage("empty file")
    im = _open_checked(data, max_pixels=max_pixels, draft_size=None)
    if im.format == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise UnreadableImage("truncated image (no JPEG end marker)")
    if im.format == "PNG":
        try:
            im.verify()
        except Exception as exc:
            if isinstance(exc, MemoryError):
                raise
            raise UnreadableImage(f"corrupt image ({_describe(exc)})") from exc


def _rgb_pixels(im: Image.Image, size: int | None) -> np.ndarray:
    """A decoded image's RGB pixels (resized and cropped to ``size`` if given).

    RGB and gray images (every JPEG) are resized as decoded, before any copy to NumPy: the
    same pixels as resizing the RGB array (Pillow resizes each band alike), with three copies
    fewer (a 224-px JPEG to 48 px: 211 -> 194 us; the rest is mostly the JPEG decode)."""
    if size is not None and im.mode in ("RGB", "L"):
        return _writable(_to_rgb(_resize_center_crop(im, size)))
    try:
        rgb = _to_rgb(im)
    except Exception as exc:  # a plugin can fail in many ways on odd files
        if isinstance(exc, MemoryError):
            raise
        raise UnreadableImage(f"cannot convert {im.mode} image to RGB ({_describe(exc)})") from exc
    if size is not None:
        rgb = np.asarray(_resize_center_crop(Image.fromarray(np.ascontiguousarray(rgb)), size))
    return _writable(rgb)


def _writable(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` C-contiguous and writable: an array NumPy reads from a Pillow image is
    read-only, and torch warns about every tensor made from one (``torch.from_numpy``)."""
    pixels = np.ascontiguousarray(pixels)
    return pixels if pixels.flags.writeable else pixels.copy()


def _open_checked(data: bytes, *, max_pixels: int, draft_size: int | None) -> Image.Image:
    """Open (read the header only) and size-check an image; set JPEG draft mode.

    Pillow's global guard is raised (never lowered) to ``max_pixels`` so that the caller's
    explicit limit is the one that applies, and so that the check happens here, with a
    message naming the numbers, before the decoder allocates anything.
    """
    if max_pixels > (Image.MAX_IMAGE_PIXELS or max_pixels):
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        im: Image.Image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as exc:
        raise UnreadableImage(_unidentified_reason(data)) from exc
    except Image.DecompressionBombError as exc:
        match = _BOMB_PIXELS.search(str(exc))
        pixels = match.group(1) if match else "too many"
        raise UnreadableImage(f"decompression bomb: {pixels} pixels > limit {max_pixels}") from exc
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        raise UnreadableImage(f"cannot open image ({_describe(exc)})") from exc

    width, height = im.size
    if width * height > max_pixels:
        raise UnreadableImage(f"decompression bomb: {width * height} pixels > limit {max_pixels}")
    if width < 1 or height < 1:
        raise UnreadableImage(f"image has no pixels ({width}x{height})")
    if draft_size is not None and im.format == "JPEG":
        # DCT-domain downscaling: a 12 Mpx photo decodes ~8x faster; the result stays
        # at least draft_size on both sides, and the whole stream is still read, so
        # truncation is still detected.
        im.draft(None, (draft_size, draft_size))
    return im


def _load_oriented(im: Image.Image) -> Image.Image:
    """Decode the pixels now (truncated or corrupt data fails here) and apply EXIF rotation.

    The result is a new image (a copy when there is nothing to rotate); the caller drops
    ``im`` so that only one copy of the pixels stays alive.
    """
    try:
        im.load()
        return ImageOps.exif_transpose(im)
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        message = str(exc)
        if "truncated" in message or isinstance(exc, EOFError):
            raise UnreadableImage(f"truncated image ({_describe(exc)})") from exc
        raise UnreadableImage(f"corrupt image ({_describe(exc)})") from exc


def _unidentified_reason(data: bytes) -> str:
    """Why Pillow found no decoder: a known format raytl does not decode, or not an image.

    Only the plugins' signature checks look at the bytes (their first 16, as Pillow does);
    no plugin opens them.
    """
    prefix = data[:16]
    Image.init()
    for name, (_factory, accept) in Image.OPEN.items():
        if name in IMAGE_FORMATS or accept is None:
            continue
        try:
            match = accept(prefix)
        except Exception:  # a signature check on too few bytes
            continue
        if match and not isinstance(match, str):
            supported = ", ".join(IMAGE_FORMATS)
            return f"unsupported image format {name} (raytl decodes {supported})"
    return "not an image (cannot identify image file)"


def _describe(exc: BaseException) -> str:
    """'OSError: image file is truncated' without the byte counts that vary between runs."""
    message = re.sub(r"\s*\(\d+ bytes not processed\)", "", str(exc)).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Map any Pillow mode to an ``(H, W, 3)`` uint8 RGB array, consistently.

    Transparent pixels are composited on white (what a viewer shows), high bit depths are
    scaled (not clipped) to 8 bits, and CMYK goes through Pillow's conversion.
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "1"):
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode.startswith("I;16") or mode == "I":
        return _gray_to_rgb(_scale_integer(im))
    if mode == "F":
        return _gray_to_rgb(_scale_float(im))
    if mode == "P":
        if "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA"):
            return _composite_on_white(im.convert("RGBA"))
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode == "RGBA":  # no converted copy: the blend reads the decoded pixels directly
        return _composite_on_white(im)
    if mode in ("LA", "PA", "RGBa", "La"):
        return _composite_on_white(im.convert("RGBA"))
    if mode in ("L;16", "I;16S"):  # rare raw modes: go through 32-bit integers
        return _gray_to_rgb(_scale_integer(im.convert("I")))
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow knows how to get to RGB.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _row_bands(im: Image.Image) -> Iterator[tuple[slice, np.ndarray]]:
    """The image's pixels as arrays of a few rows at a time (:data:`_BAND_PIXELS` each), so
    that widening them (to uint16 or float64) never costs more than a few MB at once."""
    width, height = im.size
    step = max(1, _BAND_PIXELS // width)
    for top in range(0, height, step):
        bottom = min(top + step, height)
        yield slice(top, bottom), np.asarray(im.crop((0, top, width, bottom)))


def _scale_integer(im: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit integer grayscale image to 0..255 by its bit depth.

    Dividing by ``2**bits - 1`` maps full white to 255 and mid-gray to ~128, where
    ``convert("RGB")`` would clip every value above 255 to white.
    """
    factor = 255.0 / (2.0 ** _bit_depth(im) - 1.0)
    gray = np.empty((im.height, im.width), dtype=np.uint8)
    for rows, band in _row_bands(im):
        scaled = np.clip(band.astype(np.float64), 0, None) * factor
        gray[rows] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return gray


def _scale_float(im: Image.Image) -> np.ndarray:
    """A float image to 0..255: values in [0, 1] are scaled by 255, others rounded and clipped;
    NaN and infinities become 0."""

    def finite(band: np.ndarray) -> np.ndarray:
        return np.nan_to_num(band.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)

    extremes = [(float(v.min()), float(v.max())) for v in (finite(b) for _, b in _row_bands(im))]
    unit = min(lo for lo, _ in extremes) >= 0.0 and max(hi for _, hi in extremes) <= 1.0
    gray = np.empty((im.height, im.width), dtype=np.uint8)
    for rows, band in _row_bands(im):
        values = finite(band) * 255.0 if unit else finite(band)
        gray[rows] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return gray


def _bit_depth(im: Image.Image) -> int:
    """The sample depth: from the mode, else from a TIFF tag, else the smallest that fits."""
    if im.mode.startswith("I;16"):
        return 16
    tag = getattr(im, "tag_v2", None)
    if tag is not None:
        bits = tag.get(_TIFF_BITS_PER_SAMPLE)
        if isinstance(bits, tuple):
            bits = bits[0] if bits else None
        if isinstance(bits, int) and 1 <= bits <= 32:
            return bits
    peak = float(max(int(np.asarray(band).max()) for _, band in _row_bands(im)))
    if peak <= 255:
        return 8
    if peak <= 65535:
        return 16
    return 32


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _composite_on_white(rgba: Image.Image) -> np.ndarray:
    """Alpha-blend an RGBA image on white with integer rounding: alpha 0 -> white, alpha 255 ->
    the colour.

    ``(c * a + 255 * (255 - a) + 127) // 255`` never exceeds 65152, so it is exact in uint16;
    it runs over bands of rows, so beside the decoded image and the RGB result only a few MB
    are in use, whatever the image's size.
    """
    out = np.empty((rgba.height, rgba.width, 3), dtype=np.uint8)
    for rows, band in _row_bands(rgba):
        alpha = band[:, :, 3:4].astype(np.uint16)
        blended = band[:, :, :3] * alpha
        blended += (255 - alpha) * np.uint16(255) + np.uint16(127)
        blended //= np.uint16(255)
        out[rows] = blended
    return out


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic; Pillow antialiases when shrinking), crop."""
    width, height = im.size
    if (height, width) == (size, size):
        return im
    scale = size / min(height, width)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))
