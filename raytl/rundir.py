"""The output folder of a search (or of ``raytl train`` / ``compare``): what goes in it, and how.

Layout (README, "The output folder of a search")::

    space.yaml  results.parquet  results.csv  history.parquet  report.md (+ PNGs)  skipped.txt
    tensorboard/  best/  ray/  .data_fingerprint  .trial_clock.json

This module prepares the folder (never into someone's non-empty folder without ``--overwrite``,
and ``--overwrite`` clears only a folder raytl made: it carries ``.raytl-run.json``), writes the
bookkeeping files, and publishes the reviewable outputs to ``search.storage``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import yaml

from raytl import __version__
from raytl.config import SpaceConfig
from raytl.data.dataset import ImageData
from raytl.errors import RaytlError, first_line
from raytl.storage import Storage, atomic_write, shown_location

FINGERPRINT = ".data_fingerprint"
TRIAL_CLOCK = ".trial_clock.json"  # the driver's clock per trial: launched, finished
END_FILE = "search_end.json"  # what ended the search (its trials, or search.time_budget_s)
PLOTS = (
    "metric_per_trial.png",
    "metric_by_strategy.png",
    "metric_vs_freeze_depth.png",
    "learning_curves.png",
    "metric_vs_latency.png",
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
    END_FILE,
)
SEARCH_OUTPUTS = ("ray", *PUBLISHED, "skipped.txt", *PLOTS, TRIAL_CLOCK, FINGERPRINT)
MARKER = ".raytl-run.json"
MIN_FREE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class RunMarker:
    """What marks a folder as raytl's own (``.raytl-run.json``): only such a folder is ever
    cleared by ``--overwrite``, and its run id names the run's experiment on shared storage."""

    run_id: str
    raytl_version: str
    created: float

    @staticmethod
    def new(run_id: str | None = None) -> RunMarker:
        return RunMarker(run_id or new_run_id(), __version__, time.time())


def new_run_id() -> str:
    """A run id that sorts by time and does not collide: ``20261129-214500-3fa2c1``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def read_marker(output: Path) -> RunMarker | None:
    path = Path(output) / MARKER
    if not path.is_file():
        return None
    try:
        return RunMarker(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise RaytlError(f"{path}: not a raytl run marker ({exc})") from None


def write_marker(output: Path, marker: RunMarker) -> RunMarker:
    atomic_write(Path(output) / MARKER, json.dumps(dataclasses.asdict(marker)) + "\n")
    return marker


def ensure_marker(output: Path) -> RunMarker:
    """The output folder's run marker, written now if the folder has none (a library caller
    that did not go through :func:`prepare_output`)."""
    marker = read_marker(output)
    if marker is None:
        marker = write_marker(output, RunMarker.new())
    return marker


def prepare_output(
    output: Path,
    *,
    overwrite: bool = False,
    protect: Sequence[Path] = (),
    clear: Sequence[str] = SEARCH_OUTPUTS,
    run_id: str | None = None,
) -> Path:
    """Create the output folder and mark it as a new run; refuse a non-empty one unless
    ``overwrite``, which then removes the ``clear`` entries, and only in a folder raytl made.

    ``protect``: folders the user's inputs live in (the data, the space file's folder); an output
    folder that contains one or lies inside one is never cleared.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise RaytlError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            resumable = (output / "space.yaml").is_file()
            hint = f"`raytl resume {output}` continues its search, " if resumable else ""
            raise RaytlError(
                f"{output}: already exists and is not empty; {hint}pass --overwrite to "
                "replace it, or another --output"
            )
        check_clearable(output, protect)
        for name in clear:
            path = output / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    try:
        output.mkdir(parents=True, exist_ok=True)
        write_marker(output, RunMarker.new(run_id))
    except OSError as exc:
        raise RaytlError(f"{output}: cannot write there ({exc.strerror or exc})") from None
    return output


def check_clearable(output: Path, protect: Sequence[Path] = ()) -> None:
    """Refuse to clear anything in a folder that raytl did not make, or that is (or holds, or
    lies inside) the user's home, the file system's root, the current folder's parents or inputs."""
    folder = Path(output).resolve()
    cwd = Path.cwd().resolve()
    if folder == Path(folder.anchor) or folder == Path.home().resolve() or folder in cwd.parents:
        raise RaytlError(
            f"{output}: refusing to clear the home folder, the root or a parent of the current "
            "folder; choose an --output of its own"
        )
    for kept in protect:
        kept = Path(kept).resolve()
        if folder == kept or folder in kept.parents or kept in folder.parents:
            raise RaytlError(
                f"{output}: refusing to clear it: it holds or lies inside {kept}, which the "
                "search reads; choose an --output of its own"
            )
    if read_marker(output) is None:
        raise RaytlError(
            f"{output}: --overwrite clears only folders raytl made (they hold {MARKER}), and "
            "this one has none; nothing was deleted. Choose another --output, or empty it yourself"
        )


def write_space(output: Path, config: SpaceConfig) -> None:
    """The resolved configuration that ran, as ``space.yaml`` (loadable by ``load_space``)."""
    atomic_write(output / "space.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def write_skipped(output: Path, data: ImageData) -> None:
    """List every unreadable file that was skipped, with its reason, in ``skipped.txt``."""
    if data.skipped:  # a file name's own bytes, even where they are not UTF-8
        lines = [
            os.fsencode(s.path) + f"\t{s.reason}\n".encode("utf-8", "surrogateescape")
            for s in data.skipped
        ]
        atomic_write(output / "skipped.txt", b"".join(lines))


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
    launch. Bookkeeping: a failed write (a full disk) is a warning, never the search's end."""
    clock = read_trial_clock(output)
    times = clock.setdefault(trial_id, {})
    if event != "launched_at" or event not in times:
        times[event] = time.time()
    try:
        atomic_write(Path(output) / TRIAL_CLOCK, json.dumps(clock))
    except OSError as exc:
        warnings.warn(
            f"{Path(output) / TRIAL_CLOCK}: cannot record the trial clock ({exc.strerror or exc}); "
            "the search goes on, its overhead_seconds may be missing",
            stacklevel=2,
        )


def check_storage(location: str | None) -> None:
    """Before anything is computed: ``search.storage`` can be written (a probe file made and
    removed); else one line naming the location and what failed, instead of a traceback from
    the first trial."""
    if not location:
        return
    try:
        Storage(location).probe()
    except (OSError, pa.ArrowException) as exc:
        raise RaytlError(
            f"search.storage {shown_location(location)} cannot be written: {first_line(exc)}"
        ) from None


def check_free_space(output: Path, needed_bytes: int = MIN_FREE_BYTES) -> None:
    """Warn before a search starts when the output's disk is nearly full (checkpoints of every
    epoch, TensorBoard runs and the refit model all go there)."""
    free = shutil.disk_usage(output).free
    if free < needed_bytes:
        warnings.warn(
            f"{output}: only {free / 2**20:.0f} MiB free on its disk; a search writes a checkpoint "
            f"of every trial's every epoch: {needed_bytes / 2**30:.0f} GiB or more is safer",
            stacklevel=2,
        )


def publish(output: Path, storage: str) -> None:
    """Copy the reviewable outputs next to the experiment on ``search.storage`` (a shared folder or
    a pyarrow URI such as s3://), so whoever reads the storage has the results and TensorBoard runs."""
    Storage(storage).upload(output, list(PUBLISHED))
