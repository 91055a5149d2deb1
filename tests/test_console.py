"""The console: raytl's lines on it, everything else the process (and what it starts) writes in
the log, and all of it on the console with ``verbose``."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import os, subprocess, sys
from pathlib import Path
from raytl.console import ray_output_to, say
say("before")
with ray_output_to(Path(sys.argv[1]), verbose=sys.argv[2] == "1"):
    print("python print")
    print("python stderr", file=sys.stderr)
    subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"], check=True)
    say("raytl line")
print("after")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_only_raytl_lines_reach_the_console_unless_verbose(tmp_path, verbose):
    log = tmp_path / "ray-output.log"
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(log), "1" if verbose else "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    others = ["python print", "python stderr", "child stdout", "child stderr"]
    console = done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "before" and "raytl line" in done.stdout
    assert done.stdout.splitlines()[-1] == "after"  # the console is given back
    if verbose:
        assert all(line in console for line in others) and not log.exists()
    else:
        assert not any(line in console for line in others)
        assert log.read_text().split() == " ".join(others).split()
        assert oct(log.stat().st_mode & 0o777) == "0o600"
