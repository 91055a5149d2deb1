"""The output folder of a search (or of ``raytl train`` / ``compare``): what goes in it, and how.

Layout (README, "The output folder of a search")::

    space.yaml  results.parquet  results.csv  history.parquet  report.md (+ PNGs)  skipped.txt
    tensorboard/  best/  ray/  .data_fingerprint  .trial_clock.json

This module prepares the folder (never into someone's non-empty folder without ``--overwrite``),
writes the bookkeeping files, clears what an earlier search wrote, and publishes the reviewable
outputs to ``search.storage``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from raytl.config import SpaceConfig
from raytl.data.dataset import ImageData
from raytl.errors import RaytlError
from raytl.storage import Storage, atomic_write

FINGERPRINT = ".data_fingerprint"
TRIAL_CLOCK = ".trial_clock.json"  # the driver's clock per trial: launched, finished
PLOTS = (
    "metric_per_trial.png",
    "metric_by_strategy.png",
    "metric_vs_freeze_depth.png",
    "learning_curves.png",
    "confusion_matrix.png",
)
PUBLISHED = (
    "tensorboard",
    "best",
    "results.parquet",
    "results.csv",
    "history.parquet",
    "report.md",
    "space.yaml",
)
SEARCH_OUTPUTS = ("ray", *PUBLISHED, "skipped.txt", *PLOTS, TRIAL_CLOCK, FINGERPRINT)


def prepare_output(output: Path, *, overwrite: bool = False) -> Path:
    """Create the output folder; refuse a non-empty one unless ``overwrite`` (nothing is lost)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise RaytlError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        hint = (
            f"`raytl resume {output}` continues its search, "
            if (output / "space.yaml").is_file()
            else ""
        )
        raise RaytlError(
            f"{output}: already exists and is not empty; {hint}pass --overwrite to "
            "replace it, or another --output"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RaytlError(f"{output}: cannot write there ({exc.strerror or exc})") from None
    return output


def clear_search_outputs(output: Path) -> None:
    """Remove what an earlier search wrote to ``output`` (``--overwrite``), and nothing else.

    Without this, the new search's TensorBoard runs and Tune experiment would mix with the old.
    """
    for name in SEARCH_OUTPUTS:
        path = Path(output) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_space(output: Path, config: SpaceConfig) -> None:
    """The resolved configuration that ran, as ``space.yaml`` (loadable by ``load_space``)."""
    atomic_write(output / "space.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def write_skipped(output: Path, data: ImageData) -> None:
    """List every unreadable file that was skipped, with its reason, in ``skipped.txt``."""
    if data.skipped:
        atomic_write(
            output / "skipped.txt", "".join(f"{s.path}\t{s.reason}\n" for s in data.skipped)
        )


def check_same_data(output: Path, data: ImageData, resume: bool) -> None:
    """Record the data's fingerprint; a resumed search must see exactly the same data."""
    path = output / FINGERPRINT
    if resume and path.is_file() and path.read_text().strip() != data.fingerprint:
        raise RaytlError(
            f"{output}: the data changed since the search started (fingerprint "
            f"{path.read_text().strip()}, now {data.fingerprint}); resuming would mix "
            "trials scored on different data"
        )
    if not resume or not path.is_file():
        atomic_write(path, data.fingerprint + "\n")


def read_trial_clock(output: Path) -> dict[str, dict[str, float]]:
    """The driver's wall clock per trial (launched_at, finished_at), kept across resumes."""
    path = Path(output) / TRIAL_CLOCK
    return json.loads(path.read_text()) if path.is_file() else {}


def tick_trial_clock(output: Path, trial_id: str, event: str) -> None:
    """Record ``event`` (launched_at, finished_at) for a trial; a retried trial keeps its first
    launch."""
    clock = read_trial_clock(output)
    times = clock.setdefault(trial_id, {})
    if event != "launched_at" or event not in times:
        times[event] = time.time()
    atomic_write(Path(output) / TRIAL_CLOCK, json.dumps(clock))


def publish(output: Path, storage: str) -> None:
    """Copy the reviewable outputs next to the experiment on ``search.storage`` (a shared folder or
    a pyarrow URI such as s3://), so whoever reads the storage has the results and TensorBoard runs."""
    Storage(storage).upload(output, list(PUBLISHED))
