"""What a person sees: raytl's own lines on the console, Ray's and Tune's output in a log file.

While a search runs Ray (:func:`ray_output_to`), this process's standard output and error (file
descriptors 1 and 2, inherited by every Ray process it starts: raylet warnings, Tune's tables,
the workers' forwarded logs) go to ``OUTPUT/ray-output.log``; raytl's lines (:func:`say`) and its
progress displays go to the console it had before. ``--verbose`` leaves everything on the console.
On a terminal the search's progress is one live bar; elsewhere (CI, a Ray Job's log) plain lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

LOG_NAME = "ray-output.log"

_console: TextIO | None = None  # raytl's own stream while fds 1 and 2 go to the log


def stream() -> TextIO:
    """Where raytl's lines go now."""
    return _console or sys.stdout


def is_terminal() -> bool:
    """Whether raytl's lines reach a terminal (live displays) or a file or pipe (plain lines)."""
    try:
        return stream().isatty()
    except (AttributeError, ValueError):
        return False


def say(line: str) -> None:
    """One line of raytl's output (above a live bar, if one is showing)."""
    tqdm.write(line, file=stream())
    stream().flush()


@contextlib.contextmanager
def ray_output_to(log: Path, *, verbose: bool) -> Iterator[None]:
    """Send this process's fds 1 and 2 (and so every process it starts) to ``log`` (appended),
    raytl's :func:`say` to the console they were; restore both after. ``verbose``: no change."""
    global _console
    if verbose or _console is not None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        _console = console
        yield
    finally:
        _console = None
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)
        console.close()


def bar(total: int | None, desc: str, unit: str = "it") -> Any:
    """A progress bar on the console, shown only on a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream(),
        disable=not is_terminal(),
        dynamic_ncols=True,
        leave=False,
    )


def wait_for(ref: Any, desc: str) -> Any:
    """``ray.get(ref)``, with the seconds it has taken counting on a terminal (a feature cache or a
    refit runs in a Ray task, whose steps the driver does not see)."""
    import ray

    if not is_terminal():
        return ray.get(ref)
    started = time.perf_counter()
    with tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=stream(), leave=False) as shown:
        while not ray.wait([ref], timeout=1.0)[0]:
            shown.set_description_str(desc)
            shown.refresh()
        shown.set_postfix_str(f"{time.perf_counter() - started:.0f}s")
    return ray.get(ref)
