"""``raytl predict``: top classes with probabilities for image files, from a saved model folder;
``--output`` writes them as a table (CSV or Parquet), one row per image."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from raytl.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, UnreadableImage, decode_image
from raytl.data.sources.decode import ordered_map
from raytl.errors import RaytlError
from raytl.models import load_saved_model
from raytl.preprocess import BatchPreparer, default_device
from raytl.storage import atomic_write

PREDICT_BATCH = 64
TABLE_SUFFIXES = (".csv", ".parquet")


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


def _decoded(path: Path, size: int) -> np.ndarray | str:
    """The file's pixels at ``size``, or why it cannot be read."""
    try:
        return decode_image(path.read_bytes(), size=size, max_pixels=DEFAULT_MAX_PIXELS)
    except (UnreadableImage, OSError) as exc:
        return str(exc)


@torch.no_grad()
def probabilities(model: nn.Module, prepare: BatchPreparer, pixels: np.ndarray) -> torch.Tensor:
    """The model's class probabilities (on the CPU) for a uint8 ``(N, H, W, 3)`` batch: one
    forward pass, in bfloat16 autocast on a GPU. ``predict`` and ``evaluate`` both use it."""
    device = prepare.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(prepare(pixels))
    return torch.softmax(logits.float(), 1).cpu()


def ready_model(model_dir: Path) -> tuple[nn.Module, BatchPreparer, list[str]]:
    """A saved model in eval mode on the default device, its batch preparer and class names."""
    model, pre, class_names, _ = load_saved_model(model_dir)
    device = default_device()
    model.to(device).eval()
    return model, BatchPreparer(pre, device), class_names


@torch.no_grad()
def predict_paths(model_dir: Path, paths: list[Path], *, top: int = 3) -> list[Prediction]:
    """Classify every image (folders are searched recursively), :data:`PREDICT_BATCH` at a time:
    the files decoded on a thread pool (a bounded window ahead), each batch through the model
    at once; unreadable files get an error instead of a prediction."""
    model, prepare, class_names = ready_model(model_dir)
    size = prepare.pre.image_size
    files = _expand(paths)
    results: list[Prediction] = []
    decoded = ordered_map(lambda path: _decoded(path, size), files)
    for start in range(0, len(files), PREDICT_BATCH):
        batch = list(zip(files[start : start + PREDICT_BATCH], decoded, strict=False))
        good = [(path, pixels) for path, pixels in batch if isinstance(pixels, np.ndarray)]
        probs = probabilities(model, prepare, np.stack([p for _, p in good])) if good else None
        row = iter(range(len(good)))
        for path, pixels in batch:
            if not isinstance(pixels, np.ndarray) or probs is None:
                results.append(Prediction(str(path), [], str(pixels)))
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


def check_table_path(path: Path) -> None:
    """Refuse an output file raytl cannot write, before any work."""
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise RaytlError(
            f"{path}: cannot write predictions as {path.suffix or 'a file without a suffix'!r}; "
            f"expected one of {', '.join(TABLE_SUFFIXES)}"
        )


def predictions_table(results: list[Prediction], top: int) -> pd.DataFrame:
    """One row per image: path, class_1, prob_1, ..., class_K, prob_K, and error ("" when the
    file was read; the class and probability columns are then empty)."""
    rows = []
    for r in results:
        row: dict[str, object] = {"path": r.path}
        for k in range(top):
            name, prob = r.top[k] if k < len(r.top) else (None, None)
            row[f"class_{k + 1}"], row[f"prob_{k + 1}"] = name, prob
        rows.append({**row, "error": r.error or ""})
    columns = ["path", *(f"{c}_{k + 1}" for k in range(top) for c in ("class", "prob")), "error"]
    table = pd.DataFrame(rows, columns=columns)
    for k in range(top):
        table[f"class_{k + 1}"] = table[f"class_{k + 1}"].astype("string")
        table[f"prob_{k + 1}"] = table[f"prob_{k + 1}"].astype("float64")
    return table.astype({"path": "string", "error": "string"})


def write_predictions(results: list[Prediction], path: Path, top: int) -> None:
    """The predictions as a CSV or Parquet table at ``path`` (by its suffix)."""
    check_table_path(path)
    table = predictions_table(results, top)
    if path.suffix.lower() == ".csv":
        atomic_write(path, table.to_csv(index=False))
    else:
        atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))


def run(args: argparse.Namespace) -> int:
    """``raytl predict MODEL_DIR IMAGES... [--top K] [--output FILE.csv|FILE.parquet]``."""
    if args.top < 1:
        raise RaytlError(f"--top: expected >= 1, got {args.top}")
    output = Path(args.output) if args.output else None
    if output is not None:
        check_table_path(output)
    results = predict_paths(Path(args.model_dir), [Path(p) for p in args.images], top=args.top)
    print(format_predictions(results))
    if output is not None:
        top = max([len(r.top) for r in results], default=0) or args.top
        write_predictions(results, output, top)
        print(f"wrote {len(results)} row(s) to {output}")
    return 0 if all(r.error is None for r in results) else 1
