"""The start-up trace: when each process of a trial reached each stage of its start-up, for
benchmarks/startup.py (docs/benchmarks.md, "Trial start-up"). Only the standard library: the
setup hook of every Ray worker process (:mod:`raytl.preload_claims`) writes to it too."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

# a file each process of a trial appends its start-up stages to, one JSON line per stage (wall
# clock, pid, the trial's start as its key): what benchmarks/startup.py times; unset, nothing is written
STARTUP_TRACE = "RAYTL_STARTUP_TRACE"


def trace_startup(stage: str, trial: float, **extra: Any) -> None:
    """Append one start-up stage of the trial that started at ``trial`` to $RAYTL_STARTUP_TRACE."""
    path = os.environ.get(STARTUP_TRACE)
    if path:
        line = {"stage": stage, "time": time.time(), "pid": os.getpid(), "trial": trial, **extra}
        with open(path, "a") as trace:  # one short append per line: whole lines on Linux
            trace.write(json.dumps(line) + "\n")


def process_started() -> float:
    """When this process started (wall clock, from /proc: 10 ms resolution); NaN elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
