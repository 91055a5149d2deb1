"""Imports done ahead in a process started ahead for a Train controller.

A Train worker's process imports torch, timm and Ray Train ahead through its runtime env's setup
hook (:mod:`raytl.warm_workers`): every process with that env is a worker. A controller's runtime
env is Train's own, and its helper actors (the placement-group cleaner, the synchronization actor)
share it without needing torch or Ray Train: importing them in each would cost about 2.5 s of CPU
a helper. So the local Ray raytl starts runs :func:`on_process_start` in every Python worker
process (Ray's setup-hook variable in its raylet's environment, :mod:`raytl.cluster`), and it
imports only where a *claim* waits for a process like it: a file left in the local Ray's folder
by whoever asks the raylet for the process (:func:`leave_claims`), naming the runtime env's
variables and the modules. The first process with those variables to start takes it (an atomic
rename); the helpers, started later and on demand, find none. A claim nobody took within
:data:`CLAIM_TTL_S` is dropped, so a process the raylet did not start leaves no claim for a later
helper.

Only the standard library is imported here (and raytl's start-up trace, which imports only it):
the hook runs in every Ray worker process.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from raytl.startup_trace import process_started, trace_startup

SETUP_HOOK_VAR = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
# what ray.init(runtime_env={"worker_process_setup_hook": "module.function"}) sets for a job's
# workers (ray._private.runtime_env.setup_hook): Ray's worker runs it after connecting and before
# taking work, and a runtime env's env_vars override the raylet's environment

HOOK = f"{__name__}.on_process_start"
"""Ray's setup hook for every Python worker process of the local Ray raytl starts."""

FOLDER = "raytl-preload-claims"
"""In the local Ray's own temp folder (``RAY_TMPDIR``), removed with it."""

CLAIM_TTL_S = 30.0
"""How long a claim waits for its process (which starts within a few seconds of the request)."""

_log = logging.getLogger(__name__)


def claims_folder() -> Path | None:
    """Where claims are left: in the local Ray's folder; None outside one (a cluster's node)."""
    tmp = os.environ.get("RAY_TMPDIR")
    return Path(tmp) / FOLDER if tmp and os.path.isdir(tmp) else None


def leave_claims(serialized_env: str, modules: Sequence[str], count: int = 1) -> int:
    """Before asking for ``count`` processes with the runtime env ``serialized_env``: leave a claim
    for each, so each imports ``modules`` as it starts. Returns how many were left (0 outside a
    local Ray)."""
    folder = claims_folder()
    if folder is None:
        return 0
    folder.mkdir(exist_ok=True)
    claim = {"env_vars": json.loads(serialized_env).get("env_vars", {}), "modules": list(modules)}
    for _ in range(count):
        name = f"claim-{uuid.uuid4().hex}"
        partial = folder / f".{name}"
        partial.write_text(json.dumps(claim))
        partial.rename(folder / name)  # a claim is there whole, or not at all
    return count


def take_claim(environ: Mapping[str, str], now: float | None = None) -> list[str] | None:
    """The modules of one claim waiting for a process with this environment, taken (no other
    process gets it); None where none waits. A claim waits for a process whose environment has
    its runtime env's variables: the process's own runtime env is not known before it takes work
    (Ray's core worker has none until its first task), but its variables are in the environment.
    Only a Train controller's and its helpers' processes have a controller's (a Train worker's
    have them too, but run their own hook); the helpers start after their controller took its
    claim. Claims older than :data:`CLAIM_TTL_S` are removed, not taken."""
    folder = claims_folder()
    if folder is None:
        return None
    now = time.time() if now is None else now
    for claim in sorted(folder.glob("claim-*")):
        try:
            wanted = json.loads(claim.read_text())
            fresh = now - claim.stat().st_mtime <= CLAIM_TTL_S
        except (OSError, ValueError):  # taken meanwhile
            continue
        if not fresh:
            claim.unlink(missing_ok=True)
        elif all(environ.get(k) == v for k, v in wanted["env_vars"].items()):
            taken = claim.with_name(f".taken-{os.getpid()}")
            try:
                claim.rename(taken)
            except OSError:  # another process took it first
                continue
            taken.unlink(missing_ok=True)
            return [str(m) for m in wanted["modules"]]
    return None


def on_process_start() -> None:
    """Ray's setup hook: import what a claim waiting for a process like this one names. Never
    raises (Ray ends a process whose hook fails)."""
    try:
        modules = take_claim(os.environ)
        done = import_each(modules) if modules else None
        if done is not None:
            # no trial yet: keyed 0; benchmarks/startup.py and the tests find it by its pid
            trace_startup("claim_preloaded", 0.0, process=process_started(), preloaded=done)
    except Exception:  # an optimisation only  # noqa: BLE001
        _log.debug("raytl: preloading a claimed process failed", exc_info=True)


def import_each(modules: Sequence[str]) -> float | None:
    """Import ``modules`` in a process that waits for work: when that was done (wall clock), or
    None where one failed (the actor's own import of it reports it). Never raises."""
    try:
        for name in modules:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001
        _log.debug("raytl: preloading %s failed", modules, exc_info=True)
        return None
    return time.time()
