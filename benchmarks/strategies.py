"""Test accuracy and time of each transfer strategy, one configuration each, on real offline data.

    .venv/bin/python benchmarks/strategies.py            # digits + a Fashion-MNIST subset
    .venv/bin/python benchmarks/strategies.py --quick    # digits only

Prints a table and writes it to docs/benchmarks.md (the "Strategies" section). Each run is
``raytl train`` (one holdout unit, no Ray) with the configuration named below, so the figures are
what a user gets from the command line on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from raytl.space_file import parse_space
from raytl.train import train_single

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"

STRATEGIES = {
    "linear_probe": {"strategy": "linear_probe", "head_lr": 0.02},
    "fine_tune": {
        "strategy": "fine_tune",
        "freeze_depth": 1,
        "head_lr": 0.01,
        "backbone_lr": 0.002,
    },
    "lp_ft": {"strategy": "lp_ft", "freeze_depth": 1, "head_lr": 0.01, "backbone_lr": 0.002},
    "scratch": {"strategy": "scratch", "head_lr": 0.01, "backbone_lr": 0.003},
}

DATASETS = {
    "digits": {"source": "digits", "image_size": 48},
    "fashion-mnist (3,000)": {"source": "fashion-mnist", "image_size": 48, "limit": 3000},
}


def run(data: dict, params: dict, epochs: int) -> dict:
    config = parse_space(
        {
            "data": data,
            "search": {"max_epochs": epochs},
            "space": {**params, "batch_size": 64},
        },
        "benchmarks/strategies.py",
    )
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = train_single(config, Path(out), progress=False, echo=lambda line: None)
        summary["wall"] = time.perf_counter() - started
    return summary


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="digits only")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    datasets = {k: v for k, v in DATASETS.items() if not args.quick or k == "digits"}
    rows = []
    for dataset, data in datasets.items():
        for name, params in STRATEGIES.items():
            s = run(data, params, args.epochs)
            row = (
                f"| {dataset} | {name} | {s['data']['train']} / {s['data']['val']} / "
                f"{s['data']['test']} | {s['val_accuracy']:.3f} | {s['test_accuracy']:.3f} | "
                f"{s['wall']:.1f} |"
            )
            print(row, flush=True)
            rows.append(row)
    section = "\n".join(
        [
            "## Strategies (`benchmarks/strategies.py`)",
            "",
            provenance(f".venv/bin/python benchmarks/strategies.py --epochs {args.epochs}"),
            "",
            f"One configuration per strategy, {args.epochs} epochs, 48 px, batch 64, `raytl train` "
            "(holdout, no Ray).",
            "",
            "| data | strategy | train / val / test images | val acc | test acc | seconds |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    write_section(section, "## Strategies")
    print(f"\nwritten to {DOC}")


def provenance(command: str) -> str:
    """'`COMMAND`, DATE, commit ABC1234 (+ uncommitted changes), MACHINE.': what every section of
    docs/benchmarks.md says first, so each figure can be traced to the run that produced it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    dirty = (
        " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    )
    return (
        f"`{command}`, {datetime.date.today()}, commit {git('rev-parse', '--short', 'HEAD')}"
        f"{dirty}, {machine()}."
    )


def write_section(section: str, heading: str, doc: Path = DOC) -> None:
    """Replace (or append) one ``## `` section of ``doc`` (docs/benchmarks.md), keeping the
    others; an empty ``section`` removes it. A section must say which commit its figures come
    from (:func:`provenance`)."""
    if section and "commit " not in section:
        raise ValueError(f"{heading}: a section must name the commit it measured (provenance())")
    text = (
        doc.read_text()
        if doc.exists()
        else "# Benchmarks\n\nFigures measured by the scripts in benchmarks/.\n\n"
    )
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        rest = text[end + 1 :] if end >= 0 else ""
        # a blank line before the next heading, whatever the section's own text ends with
        text = (
            text[:start] + (section.rstrip("\n") + "\n\n" if section and rest else section) + rest
        )
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


if __name__ == "__main__":
    main()
