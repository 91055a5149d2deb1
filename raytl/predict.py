"""``raytl predict``: top classes with probabilities for image files, from a saved model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raytl.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, UnreadableImage, decode_image
from raytl.data.sources.decode import ordered_map
from raytl.errors import RaytlError
from raytl.models import load_saved_model
from raytl.preprocess import BatchPreparer, default_device


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]
    error: str | None = None


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise RaytlError(f"{path}: no such file or folder")
    return files


PREDICT_BATCH = 64


def _decoded(path: Path, size: int) -> np.ndarray | str:
    """The file's pixels at ``size``, or why it cannot be read."""
    try:
        return decode_image(path.read_bytes(), size=size, max_pixels=DEFAULT_MAX_PIXELS)
    except (UnreadableImage, OSError) as exc:
        return str(exc)


@torch.no_grad()
def predict_paths(model_dir: Path, paths: list[Path], *, top: int = 3) -> list[Prediction]:
    """Classify every image (folders are searched recursively), :data:`PREDICT_BATCH` at a time:
    the files decoded on a thread pool (a bounded window ahead), each batch through the model
    at once; unreadable files get an error instead of a prediction."""
    model, pre, class_names, _ = load_saved_model(model_dir)
    device = default_device()
    model.to(device).eval()
    prepare = BatchPreparer(pre, device)
    files = _expand(paths)
    results: list[Prediction] = []
    decoded = ordered_map(lambda path: _decoded(path, pre.image_size), files)
    for start in range(0, len(files), PREDICT_BATCH):
        batch = list(zip(files[start : start + PREDICT_BATCH], decoded, strict=False))
        good = [(path, pixels) for path, pixels in batch if isinstance(pixels, np.ndarray)]
        probs = torch.empty(0)
        if good:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(prepare(np.stack([pixels for _, pixels in good])))
            probs = torch.softmax(logits.float(), 1).cpu()
        row = iter(range(len(good)))
        for path, pixels in batch:
            if not isinstance(pixels, np.ndarray):
                results.append(Prediction(str(path), [], pixels))
                continue
            values, indices = probs[next(row)].topk(min(top, len(class_names)))
            results.append(
                Prediction(
                    str(path),
                    [(class_names[i], float(v)) for v, i in zip(values, indices, strict=True)],
                )
            )
    return results


def format_predictions(results: list[Prediction]) -> str:
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.path}: unreadable ({r.error})")
        else:
            lines.append(f"{r.path}: " + ", ".join(f"{name} {p:.3f}" for name, p in r.top))
    return "\n".join(lines) if lines else "no images found"
