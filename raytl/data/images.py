"""Decode one encoded image (file bytes) into an RGB ``uint8`` array.

Every source that reads encoded files (image folders, Parquet shards) goes through
:func:`decode_image`, so the same bytes always give the same pixels whatever the source,
and every Pillow pitfall is handled in one place: decompression bombs are refused before
decoding, truncated files fail instead of being half-decoded, EXIF orientation is applied,
and every image mode (16-bit, palette, alpha, CMYK, float) is mapped to RGB the same way.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
"""File suffixes treated as images (compared lower-cased, so ``.JPG`` counts)."""

DEFAULT_MAX_PIXELS = 178_956_970
"""Pillow's own hard limit (twice ``Image.MAX_IMAGE_PIXELS``): bigger images are refused."""

_TIFF_BITS_PER_SAMPLE = 258
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class UnreadableImage(Exception):
    """An image that cannot be decoded; ``reason`` is the short text a SkippedFile records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_image_path(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes, *, size: int | None, max_pixels: int) -> np.ndarray:
    """Decode encoded image bytes to an RGB array, optionally resized and center-cropped.

    Args:
        data: The encoded file content (JPEG, PNG, ...).
        size: If given, the shorter side is resized to ``size`` (bicubic, antialiased) and
            the center ``size x size`` square is kept, so images of any shape stack together.
        max_pixels: Images with more pixels are refused before any pixel is decoded.

    Returns:
        A C-contiguous ``uint8`` array of shape ``(H, W, 3)``.

    Raises:
        UnreadableImage: The bytes are empty, not an image, truncated, corrupt, or too large.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not data:
        raise UnreadableImage("empty file")
    im = _open_checked(data, max_pixels=max_pixels, draft_size=size)
    try:
        rgb = _to_rgb(im)
    except Exception as exc:  # a plugin can fail in many ways on odd files
        if isinstance(exc, MemoryError):
            raise
        raise UnreadableImage(f"cannot convert {im.mode} image to RGB ({_describe(exc)})") from exc
    if size is not None:
        rgb = _resize_center_crop(rgb, size)
    return np.ascontiguousarray(rgb)


def _open_checked(data: bytes, *, max_pixels: int, draft_size: int | None) -> Image.Image:
    """Open, size-check, fully load and EXIF-orient an image.

    Pillow's global guard is raised (never lowered) to ``max_pixels`` so that the caller's
    explicit limit is the one that applies, and so that the check happens here, with a
    message naming the numbers, before the decoder allocates anything.
    """
    if max_pixels > (Image.MAX_IMAGE_PIXELS or max_pixels):
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        im: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnreadableImage("not an image (cannot identify image file)") from exc
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
    try:
        if draft_size is not None and im.format == "JPEG":
            # DCT-domain downscaling: a 12 Mpx photo decodes ~8x faster; the result stays
            # at least draft_size on both sides, and the whole stream is still read, so
            # truncation is still detected.
            im.draft(None, (draft_size, draft_size))
        im.load()  # decode now so truncated/corrupt data fails here, not later
        im = ImageOps.exif_transpose(im)
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        message = str(exc)
        if "truncated" in message or isinstance(exc, EOFError):
            raise UnreadableImage(f"truncated image ({_describe(exc)})") from exc
        raise UnreadableImage(f"corrupt image ({_describe(exc)})") from exc
    return im


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
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return _gray_to_rgb(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if mode == "P":
        if "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA"):
            return _composite_on_white(np.asarray(im.convert("RGBA"), dtype=np.uint8))
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    if mode in ("L;16", "I;16S"):  # rare raw modes: go through 32-bit integers
        return _gray_to_rgb(_scale_integer(im.convert("I")))
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow knows how to get to RGB.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _scale_integer(im: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit integer grayscale image to 0..255 by its bit depth.

    Dividing by ``2**bits - 1`` maps full white to 255 and mid-gray to ~128, where
    ``convert("RGB")`` would clip every value above 255 to white.
    """
    values = np.asarray(im).astype(np.float64)
    bits = _bit_depth(im, values)
    scaled = np.clip(values, 0, None) * (255.0 / (2.0**bits - 1.0))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _bit_depth(im: Image.Image, values: np.ndarray) -> int:
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
    peak = float(values.max()) if values.size else 0.0
    if peak <= 255:
        return 8
    if peak <= 65535:
        return 16
    return 32


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-blend on white with integer rounding: alpha 0 -> white, alpha 255 -> the colour."""
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:4].astype(np.uint32)
    blended = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def _resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic; Pillow antialiases when shrinking), crop."""
    height, width = rgb.shape[:2]
    if (height, width) == (size, size):
        return rgb
    scale = size / min(height, width)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    im = Image.fromarray(np.ascontiguousarray(rgb))
    if (new_w, new_h) != (width, height):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
