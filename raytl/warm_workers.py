"""Ray Train worker processes started ahead of their trials, with torch, timm and raytl imported.

Ray Train V2 starts each trial's workers as new actors, and every actor gets a new Python
process, which then spends seconds importing torch, timm and Ray Train before the trial can
train (docs/benchmarks.md, "Trial start-up"). Ray can start worker processes ahead of use for a
job and a runtime env (the raylet's ``PrestartWorkers`` call), and hands an idle one to the next
actor of that job whose runtime env is the same. So on the local Ray that raytl starts
(:data:`ENABLED`, set by :data:`raytl.cluster.LOCAL_TRAIN_SETTINGS`):

- the trials' Train workers get a runtime env of their own (:func:`worker_runtime_env`): Ray's
  setup hook :func:`preload`, which imports what a worker needs before the process takes work;
- before Tune launches the first trials, the driver asks for as many processes as they have
  Train controllers and workers (:func:`prestart_for_search`), and each Train worker, as it
  starts, asks its node's raylet for one process like its own, for a later trial's worker
  (:func:`prestart_successor`), and rank 0, when its training is done, for one like its
  controller's (:func:`prestart_next_controller`). About as many processes wait as
  workers and controllers run at once (one more for each worker Train restarts). A controller's
  runtime env is Train's own and shared with its helper actors, which need no torch: its process
  imports torch and Ray Train ahead through a claim left beside the request
  (:mod:`raytl.preload_claims`).

Only where the search leaves a CPU free (:func:`leaves_a_cpu`): a process prestarted while every
core trains takes its imports' seconds from the trials running (the quickstart on 2 cores, 2
trials at once: 215 s with it, 192 s without, one run each), whereas a worker started cold
imports while the trial it belongs to waits anyway.

Train still creates, watches and restarts its workers as before (a failed worker is replaced by
a new process, warm or not); only the process an actor starts in is older. Prestarting is an
optimisation: where the raylet cannot be asked (another Ray version, a refused call), trials
start their workers cold, as without it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import ray
import ray.train

from raytl import preload_claims, raylet
from raytl.config import SpaceConfig
from raytl.strategies import STRATEGIES

ENABLED = "RAYTL_WARM_TRAIN_WORKERS"
"""Set to ``1`` in the local Ray's environment (raytl.cluster), where prestarting is on."""

_log = logging.getLogger(__name__)

preloaded_at: float | None = None
"""When :func:`preload` finished in this process (wall clock); None where it did not run."""


def enabled() -> bool:
    """Whether this process's Ray is the local one raytl started (prestarting is on)."""
    return os.environ.get(ENABLED) == "1"


PRELOADED_MODULES = ("torch", "timm", "ray.train.torch", "raytl.train_loop")
"""What a trial's worker imports (torch, torchvision's ops, timm, Ray Train, raytl's trial and
unit trainer), by name, as Ray's own ``RAY_preload_python_modules`` takes them."""

CONTROLLER_MODULES = (
    "torch",
    "ray.train.torch",
    "ray.train.v2._internal.execution.controller.controller",
    "ray.tune.integration.ray_train",
)
"""What a trial's Train controller imports when it unpickles its class and arguments (Train's
controller, the Torch backend's config, Tune's report callback)."""


def preload() -> None:
    """Ray's setup hook for a Train worker's process: import :data:`PRELOADED_MODULES` while the
    process waits for work. Never raises: a failed import is left for the trial's own import
    to report."""
    global preloaded_at
    preloaded_at = preload_claims.import_each(PRELOADED_MODULES)


def worker_runtime_env() -> dict[str, Any]:
    """The Train workers' runtime env (``RunConfig(worker_runtime_env=...)``): the setup hook
    where prestarting is on, else none (Ray's default)."""
    if not enabled():
        return {}
    return {"env_vars": {preload_claims.SETUP_HOOK_VAR: f"{__name__}.{preload.__name__}"}}


def leaves_a_cpu(cluster_cpus: float, trials_at_once: int, cpus_per_trial: float) -> bool:
    """Whether the trials that run at once leave at least one CPU of the cluster's free for a
    prestarted process's imports."""
    return cluster_cpus - trials_at_once * cpus_per_trial >= 1.0


def prestart_successor(config: SpaceConfig) -> bool:
    """In a Train worker: ask this node's raylet, from a background thread (the asking takes
    about 0.1 s of GCS and raylet calls, which the first training step need not wait for), to
    start one process for this job with this worker's own runtime env, for the next trial's
    worker to start in, if the search's trials leave a CPU free. Returns whether it asks; False
    where prestarting is off."""
    if not enabled() or not ray.is_initialized():
        return False
    args = (config, own_runtime_env())
    threading.Thread(target=_prestart_one, args=args, name="raytl-prestart", daemon=True).start()
    return True


def prestart_next_controller(config: SpaceConfig) -> bool:
    """In rank 0 of a Train worker group whose training finished: ask for a process with its
    controller's runtime env, for the next trial's controller (about 0.1 s, after the trial's
    last report). Not as the worker starts: two processes starting beside the first training
    step slowed its model build from 0.2 to 0.8 s (benchmarks/startup.py). Not where the trial
    was stopped (a later trial's controller starts cold then). Returns whether it asked."""
    if not enabled() or not ray.is_initialized() or ray.train.get_context().get_world_rank():
        return False
    controller = controller_env_of(own_runtime_env())
    return _prestart_one(config, controller, CONTROLLER_MODULES)


def prestart_for_search(config: SpaceConfig) -> int:
    """In the driver, before Tune launches the first trials: ask this node's raylet for a process
    for each Train controller and worker of the trials that start at once, with the runtime envs
    they will have (:func:`train_envs`), if the search runs Train workers and its trials leave a
    CPU free. Returns how many worker processes it asked for (0: none; where prestarting is off,
    where the asking failed)."""
    if not enabled() or not ray.is_initialized() or not runs_train_workers(config):
        return 0
    r, s = config.resources, config.search
    trials = min(s.max_concurrent, s.num_samples or s.max_concurrent)
    try:
        if not _has_a_cpu_free(config):
            return 0
        controller, worker = train_envs()
        preload_claims.leave_claims(controller, CONTROLLER_MODULES, count=trials)
        raylet.prestart_from_a_worker(
            [(controller, trials), (worker, trials * r.workers_per_trial)]
        )
    except Exception:  # an optimisation only: the first trials start cold  # noqa: BLE001
        _log.debug("raytl: prestarting the first Train workers failed", exc_info=True)
        return 0
    return trials * r.workers_per_trial


def runs_train_workers(config: SpaceConfig) -> bool:
    """Whether any trial of the search may train a backbone (run Ray Train workers): not where
    every strategy trains only a head on the cached features."""
    strategies = config.options("strategy", "fine_tune")
    return not config.cache or not all(STRATEGIES[s].only_probes for s in strategies)


def _has_a_cpu_free(config: SpaceConfig) -> bool:
    r = config.resources
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    return leaves_a_cpu(cpus, config.search.max_concurrent, r.workers_per_trial * r.cpus_per_worker)


def _prestart_one(config: SpaceConfig, serialized_env: str, claim: tuple[str, ...] = ()) -> bool:
    """From a Train worker: one process with ``serialized_env`` from its raylet, if the search's
    trials leave a CPU free, with a claim to import ``claim`` where given. Whether it asked; a
    failure only means a later trial starts cold."""
    try:
        if not _has_a_cpu_free(config):
            return False
        if claim:
            preload_claims.leave_claims(serialized_env, claim)
        raylet.prestart(serialized_env, count=1)
    except Exception:  # an optimisation only  # noqa: BLE001
        _log.debug("raytl: prestarting a process failed", exc_info=True)
        return False
    return True


def train_envs() -> tuple[str, str]:
    """The runtime envs a trial's Train controller and its workers will have, as their raylet
    will see them, computed in the driver: Tune's trial actor gets Tune's variables
    (``PL_DISABLE_FORK`` and those it propagates from the driver's environment), Train's
    controller and workers those Train propagates, the workers :func:`worker_runtime_env`; Ray's
    core worker merges each child's env into its parent's and writes the JSON compact with
    sorted keys (checked against :func:`own_runtime_env` in a worker: the same text). A
    job-level runtime env would be merged in too; the local Ray raytl starts has none."""
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
        get_env_vars_to_propagate,
    )
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE

    env = dict(DEFAULT_ENV_VARS)  # Tune's trial actor (ray.tune.execution.class_cache)
    env.update({k: os.environ[k] for k in ENV_VARS_TO_PROPAGATE if k in os.environ})
    controller = get_env_vars_to_propagate()  # Train's controller (its data_parallel_trainer)
    controller.setdefault(
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE
    )
    env.update(controller)
    controller_text = _as_ray_writes_it(env)
    env.update(get_env_vars_to_propagate())  # the workers (Train's worker group)
    env.update(worker_runtime_env().get("env_vars", {}))
    return controller_text, _as_ray_writes_it(env)


def controller_env_of(worker_env: str) -> str:
    """A Train worker's controller's runtime env, from the worker's: without the variable
    :func:`worker_runtime_env` adds (Train's own are in both)."""
    env_vars = json.loads(worker_env).get("env_vars", {})
    env_vars.pop(preload_claims.SETUP_HOOK_VAR, None)
    return _as_ray_writes_it(env_vars)


def _as_ray_writes_it(env_vars: dict[str, str]) -> str:
    return json.dumps(
        {"env_vars": env_vars}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def own_runtime_env() -> str:
    """This process's runtime env as its raylet saw it: the JSON that Ray's core worker wrote
    when it merged the env into its parents' (Tune's trial, Train's controller), whose exact
    text the raylet hashes to match processes to actors ("" outside a Ray worker). What a worker
    asks for with: no guess (:func:`train_envs` is the driver's, before any worker runs). Only
    once the process runs a task: Ray's core worker has no runtime env before (and crashes)."""
    worker: Any = ray._private.worker.global_worker  # its core_worker is set once connected
    return str(worker.core_worker.get_current_runtime_env()) if ray.is_initialized() else ""
