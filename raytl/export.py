"""``raytl export MODEL_DIR --format onnx|torchscript``: a saved model as one file another runtime
loads, checked against the PyTorch model before it is kept.

The exported model takes what the PyTorch model takes: a float batch ``(N, 3, S, S)`` already
normalised with the model's preprocessing (``config.json``), any batch size. The parity check
runs the written file (ONNX Runtime, or ``torch.jit.load``) and the PyTorch model on a few
synthetic images put through that preprocessing; the file is kept only when the largest absolute
logit difference is within the tolerance (it is written beside the target and renamed).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raytl.errors import RaytlError, first_line
from raytl.models import load_saved_model
from raytl.preprocess import BatchPreparer, Preprocessing
from raytl.storage import atomic_write

SAMPLE_IMAGES = 4  # images of the parity check (the traced example is 2 others: any batch works)
DEFAULT_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
INSTALL_ONNX = "pip install 'raytl[export]' (onnx, onnxruntime, onnxscript)"


@dataclass(frozen=True)
class Exported:
    """What ``raytl export`` wrote and how close it is to the PyTorch model."""

    path: Path
    format: str
    max_abs_diff: float
    same_top: int
    samples: int
    tolerance: float

    def summary(self) -> str:
        return (
            f"exported {self.path} ({self.format}); parity on {self.samples} synthetic images: "
            f"largest absolute logit difference {self.max_abs_diff:.3g} (tolerance "
            f"{self.tolerance:g}), the same top class on {self.same_top}/{self.samples}"
        )


def synthetic_pixels(size: int, n: int, seed: int) -> np.ndarray:
    """``n`` uint8 RGB images ``(n, size, size, 3)``: a colour gradient, a bright square, noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    images = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        low, high = rng.random(3), rng.random(3)
        mix = (ramp[:, None] + ramp[None, :])[..., None] / 2
        images[i] = low + (high - low) * mix
        top, left = rng.integers(0, max(1, size // 2), size=2)
        images[i, top : top + size // 3, left : left + size // 3] = rng.random(3)
    images += rng.normal(0.0, 0.05, images.shape).astype(np.float32)
    return (images.clip(0.0, 1.0) * 255).round().astype(np.uint8)


def model_inputs(pre: Preprocessing, n: int, seed: int) -> torch.Tensor:
    """Synthetic images through the model's own preprocessing, as the exported model takes them."""
    prepare = BatchPreparer(pre, torch.device("cpu"))
    return prepare(synthetic_pixels(pre.image_size, n, seed)).contiguous()


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise RaytlError(
            f"--format onnx needs the export extra ({exc.name} is not installed): {INSTALL_ONNX}"
        ) from None
    return onnx, onnxruntime


def write_onnx(model: nn.Module, example: torch.Tensor, path: str) -> Callable[..., np.ndarray]:
    """Export with torch.onnx (the batch dimension dynamic), check the file with onnx, and
    return the file's forward pass through ONNX Runtime."""
    onnx, onnxruntime = _onnx_modules()
    try:
        torch.onnx.export(
            model,
            (example,),
            path,
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,  # one file: the weights inside
            verbose=False,
        )
    except Exception as exc:  # the exporter's own failure: one line, and the other format
        raise RaytlError(
            f"ONNX export failed: {first_line(exc)}; try --format torchscript"
        ) from exc
    onnx.checker.check_model(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"pixels": x.numpy()})[0]


def write_torchscript(
    model: nn.Module, example: torch.Tensor, path: str
) -> Callable[..., np.ndarray]:
    """Trace with torch.jit.trace, save, and return the forward pass of ``torch.jit.load``."""
    with warnings.catch_warnings():  # torch says jit is deprecated; the format is still asked for
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.")
        traced = torch.jit.trace(model, example)
        traced.save(path)
        loaded = torch.jit.load(path)
    return lambda x: loaded(x).detach().numpy()


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript}


@torch.no_grad()
def export_model(
    model_dir: Path, fmt: str, output: Path | None = None, *, tolerance: float
) -> Exported:
    """Write the saved model in ``model_dir`` as ``fmt`` (default ``MODEL_DIR/model.onnx`` or
    ``model.pt``) and check its logits against PyTorch's; raises when they differ by more than
    ``tolerance`` (nothing is left at ``output`` then)."""
    if fmt not in WRITERS:
        raise RaytlError(f"unknown export format {fmt!r}; expected one of {', '.join(WRITERS)}")
    if fmt == "onnx":
        _onnx_modules()  # before any work
    model, pre, _, _ = load_saved_model(model_dir)
    model = model.float().eval()
    path = Path(output) if output else Path(model_dir) / DEFAULT_FILES[fmt]
    example, samples = model_inputs(pre, 2, seed=1), model_inputs(pre, SAMPLE_IMAGES, seed=0)
    expected = model(samples).numpy()
    found: list[np.ndarray] = []

    def write_and_check(tmp: str) -> None:
        got = WRITERS[fmt](model, example, tmp)(samples)
        diff = float(np.abs(got - expected).max())
        if not diff <= tolerance:  # NaN fails too
            raise RaytlError(
                f"{path}: not written: the {fmt} export's logits differ from the PyTorch "
                f"model's by up to {diff:.3g} on {SAMPLE_IMAGES} synthetic images (tolerance "
                f"{tolerance:g}; --tolerance sets it)"
            )
        found.append(got)

    atomic_write(path, write_and_check)
    got = found[0]
    return Exported(
        path=path,
        format=fmt,
        max_abs_diff=float(np.abs(got - expected).max()),
        same_top=int((got.argmax(1) == expected.argmax(1)).sum()),
        samples=SAMPLE_IMAGES,
        tolerance=tolerance,
    )


def run(args: argparse.Namespace) -> int:
    """``raytl export MODEL_DIR --format onnx|torchscript [--output FILE] [--tolerance T]``."""
    if not args.tolerance >= 0:
        raise RaytlError(f"--tolerance: expected >= 0, got {args.tolerance}")
    output = Path(args.output) if args.output else None
    print(
        export_model(Path(args.model_dir), args.format, output, tolerance=args.tolerance).summary()
    )
    return 0
