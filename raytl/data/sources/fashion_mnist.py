"""The ``fashion-mnist`` source, read offline from IDX files (the MNIST file format).

The files come from Debian's ``dataset-fashion-mnist`` package, from a folder given as
``data.path``, or (``download=True``, online users only) from torchvision's downloader.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

from raytl.data.dataset import DataError, ImageData

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEFAULT_FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files."""
FASHION_MNIST_CACHE = Path.home() / ".cache" / "raytl" / "fashion-mnist"
"""Download root used when ``download=True`` and no path is given."""
_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped (``.gz``) or plain.

    Raises:
        DataError: The file is unreadable, not IDX, or shorter/longer than its header says.
    """
    file = Path(path)
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as fh:
                raw = fh.read()
        else:
            raw = file.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {file} ({type(exc).__name__}: {exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{file} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{file}: IDX header is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{file}: IDX header says shape {dims} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header} bytes; it is truncated or corrupt"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _find_idx_file(directory: Path, name: str) -> Path | None:
    """The gzipped or plain IDX file ``name`` in ``directory``, if present."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """All four Fashion-MNIST files in ``directory``, or None if any is missing."""
    found = {name: _find_idx_file(directory, name) for name in _FASHION_MNIST_FILES}
    if any(f is None for f in found.values()):
        return None
    return {name: f for name, f in found.items() if f is not None}


def load_fashion_mnist(*, path: str | None = None, download: bool = False) -> ImageData:
    """Fashion-MNIST train + test (70,000 28x28 images as RGB) from local IDX files.

    Both official splits are concatenated because raytl carves its own test split.
    """
    root = Path(path).expanduser() if path else None
    candidates = (
        [root, root / "FashionMNIST" / "raw"]
        if root is not None
        else [Path(DEFAULT_FASHION_MNIST_PATH), FASHION_MNIST_CACHE / "FashionMNIST" / "raw"]
    )
    files = next((f for f in map(_find_idx_files, candidates) if f is not None), None)
    if files is None and download:
        _download_fashion_mnist(root or FASHION_MNIST_CACHE)
        files = _find_idx_files(candidates[-1])
    if files is None:
        where = candidates[0]
        missing = [n for n in _FASHION_MNIST_FILES if _find_idx_file(where, n) is None]
        raise DataError(
            f"Fashion-MNIST files not found: {where} lacks "
            f"{', '.join(m + '.gz' for m in missing)}. "
            "Install them with `apt-get install dataset-fashion-mnist` (they go to "
            f"{DEFAULT_FASHION_MNIST_PATH}), set data.path to a folder holding the four IDX "
            "files, or set data.download: true to fetch them with torchvision"
        )
    parts = [_read_split(files, split) for split in ("train", "t10k")]
    gray = np.concatenate([x for x, _ in parts])
    return ImageData(
        images=np.repeat(gray[:, :, :, None], 3, axis=3),
        labels=np.concatenate([y for _, y in parts]),
        class_names=FASHION_MNIST_CLASSES,
        source=f"fashion-mnist ({files['train-images-idx3-ubyte'].parent})",
    )


def _read_split(files: dict[str, Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(N, 28, 28)`` uint8 images and int64 labels of one split (``train``, ``t10k``).

    Raises:
        DataError: The files are not Fashion-MNIST images and labels that match.
    """
    images_file = files[f"{split}-images-idx3-ubyte"]
    labels_file = files[f"{split}-labels-idx1-ubyte"]
    x, y = read_idx(images_file), read_idx(labels_file)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise DataError(
            f"{images_file}: expected uint8 images of shape (N, 28, 28), got {x.dtype} {x.shape}"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{labels_file}: expected {len(x)} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):  # 2.7 must not quietly become class 2
        raise DataError(f"{labels_file}: expected integer labels, got {y.dtype}")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{labels_file}: label {int(y.min())} is not a Fashion-MNIST class (0-9)")
    if len(y) and int(y.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_file}: label {int(y.max())} is not a Fashion-MNIST class (0-9)")
    return x, y.astype(np.int64)


def _download_fashion_mnist(root: Path) -> None:
    """Fetch the IDX files with torchvision into ``root/FashionMNIST/raw`` (online users only)."""
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as exc:
        raise DataError("data.download: true needs torchvision, which is not installed") from exc
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"could not download Fashion-MNIST to {root} ({type(exc).__name__}: {exc}); "
            "offline, use `apt-get install dataset-fashion-mnist` instead"
        ) from exc
