"""``raytl evaluate MODEL_DIR DATA``: a saved model scored on a labelled image folder or Parquet
shards: accuracy, balanced accuracy and macro-F1 (scikit-learn's definitions), per-class
precision/recall/F1/support, the confusion matrix and the most confident mistakes; with
``--output DIR`` also ``evaluation.md``, ``per_class.parquet``, ``predictions.parquet`` and
``confusion_matrix.png``.

The data is read with raytl's own loaders (so unreadable files are skipped, counted and named as
everywhere else) and its classes are matched to the model's by name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raytl.data import ImageData, SkippedFile, load_data
from raytl.data.stream import StreamedImages
from raytl.errors import RaytlError
from raytl.metrics import classification_figures, per_class_table
from raytl.plots import confusion_figure
from raytl.predict import PREDICT_BATCH, probabilities, ready_model
from raytl.report import markdown_table, save_figure
from raytl.storage import atomic_write

MAX_MISCLASSIFIED = 16  # listed in evaluation.md
MISCLASSIFIED_SHOWN = 5  # on stdout
SKIPPED_NAMED = 5  # skipped files named on stdout (evaluation.md lists them all)
OUTPUT_FILES = ("evaluation.md", "per_class.parquet", "predictions.parquet", "confusion_matrix.png")


@dataclass(frozen=True)
class Evaluation:
    """A model's answers on labelled data: per image the true and the predicted class (indices
    into the model's ``class_names``), the predicted class's probability and, when the images
    were streamed, the file (or shard row) it came from."""

    model_dir: str
    source: str
    class_names: list[str]
    true: np.ndarray
    predicted: np.ndarray
    probability: np.ndarray
    files: list[str] | None
    skipped: tuple[SkippedFile, ...]

    def _names(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.class_names, dtype=object)[indices]

    @property
    def labels(self) -> list[int]:
        """The model's classes that occur as a true or a predicted class, in the model's order."""
        return sorted(set(self.true.tolist()) | set(self.predicted.tolist()))

    def figures(self) -> dict[str, float]:
        """Accuracy, balanced accuracy and macro-F1 (scikit-learn's definitions, over the classes
        in :attr:`labels`: :func:`raytl.metrics.classification_figures`)."""
        return classification_figures(self.true, self.predicted)

    def per_class(self) -> pd.DataFrame:
        """class, precision, recall, f1, support: one row per class in :attr:`labels`."""
        return per_class_table(self.true, self.predicted, self.class_names)

    def predictions(self) -> pd.DataFrame:
        """index, true, predicted, probability and file (empty when not known): one row per image."""
        return pd.DataFrame(
            {
                "index": np.arange(len(self.true), dtype=np.int64),
                "true": pd.Series(self._names(self.true), dtype="string"),
                "predicted": pd.Series(self._names(self.predicted), dtype="string"),
                "probability": self.probability.astype(np.float64),
                "file": pd.Series(
                    self.files if self.files is not None else [pd.NA] * len(self.true),
                    dtype="string",
                ),
            }
        )

    def misclassified(self, limit: int = MAX_MISCLASSIFIED) -> pd.DataFrame:
        """Up to ``limit`` misclassified images, the most confidently wrong first."""
        table = self.predictions()
        wrong = table[table["true"] != table["predicted"]]
        wrong = wrong.sort_values(["probability", "index"], ascending=[False, True], kind="stable")
        return wrong.head(limit).reset_index(drop=True)


def data_source(path: str) -> str:
    """``parquet`` for a Parquet file or a folder that holds some, else ``imagefolder``."""
    location = Path(path)
    if location.suffix == ".parquet" or location.is_dir() and any(location.glob("*.parquet")):
        return "parquet"
    return "imagefolder"


def model_labels(data: ImageData, class_names: list[str], model_dir: str) -> np.ndarray:
    """The data's labels as indices into the model's classes, matched by name; a class with
    images that the model does not know is an error naming it."""
    known = {name: i for i, name in enumerate(class_names)}
    counts = data.class_counts()
    unknown = [name for name in data.class_names if name not in known and counts.get(name, 0)]
    if unknown:
        raise RaytlError(
            f"{data.source}: class(es) {', '.join(map(repr, unknown))} unknown to the model in "
            f"{model_dir} (it knows {', '.join(map(repr, class_names))}); evaluate it on data "
            "of its own classes"
        )
    index = np.array([known.get(name, -1) for name in data.class_names], dtype=np.int64)
    return index[data.labels]


@torch.no_grad()
def evaluate_model(
    model_dir: Path, data_path: str, *, image_size: int | None = None, mode: str = "auto"
) -> Evaluation:
    """Classify every image of the labelled ``data_path`` with the model in ``model_dir``,
    :data:`~raytl.predict.PREDICT_BATCH` images at a time (held or streamed alike)."""
    model, prepare, class_names = ready_model(model_dir)
    size = image_size or prepare.pre.image_size
    data = load_data(data_source(data_path), path=data_path, image_size=size, mode=mode)
    true = model_labels(data, class_names, str(model_dir))
    predicted = np.empty(len(data), dtype=np.int64)
    probability = np.empty(len(data), dtype=np.float32)
    for start in range(0, len(data), PREDICT_BATCH):
        stop = min(start + PREDICT_BATCH, len(data))
        best, index = probabilities(model, prepare, data.images[start:stop]).max(1)
        predicted[start:stop], probability[start:stop] = index.numpy(), best.numpy()
    images = data.images
    return Evaluation(
        model_dir=str(model_dir),
        source=data.source,
        class_names=list(class_names),
        true=true,
        predicted=predicted,
        probability=probability,
        files=[images.name(i) for i in range(len(data))]
        if isinstance(images, StreamedImages)
        else None,
        skipped=data.skipped,
    )


def _skipped_line(skipped: tuple[SkippedFile, ...]) -> str:
    named = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:SKIPPED_NAMED])
    more = len(skipped) - SKIPPED_NAMED
    return f"skipped {len(skipped)} unreadable file(s): {named}" + (
        f"; and {more} more" if more > 0 else ""
    )


def _wrong_lines(ev: Evaluation) -> list[str]:
    wrong = ev.misclassified(MISCLASSIFIED_SHOWN)
    total = int((ev.true != ev.predicted).sum())
    lines = [f"misclassified: {total} of {len(ev.true)}" + (", most confident:" if total else "")]
    for row in wrong.itertuples(index=False):
        where = row.file if isinstance(row.file, str) else f"image {row.index}"
        lines.append(f"  {where}: {row.true} predicted {row.predicted} ({row.probability:.3f})")
    return lines


def format_evaluation(ev: Evaluation) -> str:
    """The figures, the per-class table and the most confident mistakes, for the terminal."""
    figures = ev.figures()
    lines = [
        f"{ev.model_dir} on {ev.source}: {len(ev.true)} images of "
        f"{len(np.unique(ev.true))} classes (the model has {len(ev.class_names)})",
        f"accuracy {figures['accuracy']:.4f}  balanced accuracy "
        f"{figures['balanced_accuracy']:.4f}  macro-F1 {figures['macro_f1']:.4f}",
    ]
    if ev.skipped:
        lines.append(_skipped_line(ev.skipped))
    table = ev.per_class()
    width = max(5, *(len(name) for name in table["class"]))
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for row in table.itertuples(index=False):
        lines.append(
            f"{row[0]:<{width}}  {row.precision:9.4f}  {row.recall:6.4f}  {row.f1:6.4f}  "
            f"{row.support:7d}"
        )
    return "\n".join(lines + _wrong_lines(ev))


def evaluation_markdown(ev: Evaluation) -> str:
    """``evaluation.md``: the figures, the per-class table, the confusion matrix and the
    misclassified and skipped files."""
    figures = ev.figures()
    lines = [
        f"# Evaluation of {ev.model_dir}",
        "",
        f"Data: {ev.source}: {len(ev.true)} images; {len(ev.skipped)} unreadable file(s) skipped.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| accuracy | {figures['accuracy']:.4f} |",
        f"| balanced accuracy | {figures['balanced_accuracy']:.4f} |",
        f"| macro-F1 | {figures['macro_f1']:.4f} |",
        "",
        "## Per class",
        "",
        markdown_table(ev.per_class()),
        "",
        "## Confusion matrix",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        f"## Misclassified (up to {MAX_MISCLASSIFIED}, the most confident first)",
        "",
    ]
    wrong = ev.misclassified().drop(columns="file" if ev.files is None else [])
    lines.append(markdown_table(wrong) if len(wrong) else "None.")
    lines += ["", "`index`: the image's place in the data as read (`predictions.parquet`)."]
    if ev.skipped:
        lines += ["", "## Skipped (unreadable) files", ""]
        lines += [f"- `{s.path}`: {s.reason}" for s in ev.skipped]
    return "\n".join(lines) + "\n"


def write_evaluation(ev: Evaluation, out: Path) -> None:
    """:data:`OUTPUT_FILES` into ``out`` (created if missing; these files are replaced)."""
    per_class, predictions = ev.per_class(), ev.predictions()
    atomic_write(out / "per_class.parquet", lambda tmp: per_class.to_parquet(tmp, index=False))
    atomic_write(out / "predictions.parquet", lambda tmp: predictions.to_parquet(tmp, index=False))
    figure = confusion_figure(ev.true.tolist(), ev.predicted.tolist(), ev.class_names)
    save_figure(figure, out / "confusion_matrix.png")
    atomic_write(out / "evaluation.md", evaluation_markdown(ev))


def run(args: argparse.Namespace) -> int:
    """``raytl evaluate MODEL_DIR DATA [--output DIR] [--image-size N] [--mode M]``."""
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not out.is_dir():
        raise RaytlError(f"--output {out}: exists and is not a folder")
    ev = evaluate_model(Path(args.model_dir), args.data, image_size=args.image_size, mode=args.mode)
    print(format_evaluation(ev))
    if out is not None:
        write_evaluation(ev, out)
        print(f"wrote {', '.join(OUTPUT_FILES)} to {out}")
    return 0
