"""The ``raytl`` subcommands that use a saved model: ``predict``, ``evaluate`` and ``export``.

Only their parsers live here, and this module imports nothing but argparse, so ``raytl --help``
stays instant: each command's ``run(args)`` is in :mod:`raytl.predict`, :mod:`raytl.evaluate` and
:mod:`raytl.export`, which load torch; :mod:`raytl.cli` imports them when one of these commands
runs (the one place raytl imports lazily). User errors raised there print one line and exit 2,
like every command's.
"""

from __future__ import annotations

import argparse
from typing import Any

MODEL_COMMANDS = ("predict", "evaluate", "export")
"""The subcommands :func:`add_model_commands` adds; ``args.command`` names the one that runs."""

EXPORT_FORMATS = ("onnx", "torchscript")
PARITY_TOLERANCE = 1e-3
"""The largest absolute logit difference an export may show against the PyTorch model."""


def add_model_commands(sub: Any) -> None:
    """Add predict, evaluate and export to ``sub`` (the main parser's subparsers)."""
    _add_predict(sub)
    _add_evaluate(sub)
    _add_export(sub)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict", help="classify images with a saved model (DIR/best or a train output)"
    )
    p.add_argument("model_dir")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top", type=int, default=3, help="classes to show per image")
    p.add_argument(
        "--output",
        help="also write one row per image to FILE.csv or FILE.parquet: path, class_1, prob_1, "
        "..., class_K, prob_K, error (empty when the file was read)",
    )


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a saved model on labelled images: accuracy, balanced accuracy, macro-F1, "
        "per-class figures, confusion matrix, misclassified examples",
    )
    p.add_argument("model_dir", help="a saved model (DIR/best or a train output)")
    p.add_argument(
        "data", help="a labelled image folder (CLASS/IMAGE) or a folder of Parquet shards"
    )
    p.add_argument(
        "--output",
        help="write evaluation.md, per_class.parquet, predictions.parquet and "
        "confusion_matrix.png into this folder",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        help="decode the images at this size (default: the model's input size)",
    )
    p.add_argument(
        "--mode",
        choices=("auto", "memory", "stream"),
        default="auto",
        help="hold the decoded images or stream them (as data.mode); streamed images are "
        "named by file in the misclassified list (default: auto)",
    )


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a saved model as ONNX or TorchScript and check it gives the same logits",
    )
    p.add_argument("model_dir", help="a saved model (DIR/best or a train output)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument(
        "--output", help="the file to write (default: MODEL_DIR/model.onnx or MODEL_DIR/model.pt)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=PARITY_TOLERANCE,
        help="fail when the largest absolute logit difference between the export and the "
        f"PyTorch model exceeds this (default: {PARITY_TOLERANCE:g})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
