"""A trial's start-up: what Ray Train's controller unpickles, the local Ray's Train settings, and
the start-up trace that benchmarks/startup.py reads (docs/benchmarks.md, "Trial start-up")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ray
import ray._private.grpc_utils
from ray import cloudpickle
from ray.train.v2.api.callback import UserCallback
from ray.util.state import list_actors, list_workers

import raytl.train_loop
import raytl.trial
from raytl import preload_claims, warm_workers
from raytl.cluster import (
    LOCAL_TRAIN_SETTINGS,
    is_running,
    local_train_settings,
    ray_processes,
    ray_session,
)
from raytl.search import share_inputs, tune_search
from raytl.space_file import parse_space
from raytl.startup_trace import STARTUP_TRACE, process_started, trace_startup
from raytl.trial import SearchInputs, TrialContext

SPACE = {"name": "t", "data": {"source": "digits"}, "space": {"strategy": "fine_tune"}}


def imported_after_unpickling(value, then: str, modules, tmp_path) -> list[str]:
    """Which of ``modules`` a fresh Python has imported after unpickling ``value`` (as
    ``loaded``) and running the code ``then``."""
    pickled = tmp_path / "value.pkl"
    pickled.write_bytes(cloudpickle.dumps(value))
    code = (
        "import sys; from ray import cloudpickle\n"
        "loaded = cloudpickle.loads(open(sys.argv[1], 'rb').read())\n"
        f"{then}print(sorted(m for m in {tuple(modules)!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(pickled)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().replace("'", '"'))


def test_the_trial_context_reaches_the_workers_but_not_the_controller(tmp_path, monkeypatch):
    # TuneReportCallback refuses to exist outside a Tune session; any callback will do here
    monkeypatch.setattr(raytl.trial, "TuneReportCallback", UserCallback)
    config = parse_space(SPACE)
    ctx = TrialContext.create(SearchInputs(config, "data-ref", str(tmp_path)), {})
    trainer = raytl.trial.make_trainer(ctx, "trial_1")
    # the controller unpickles the run context: nothing of raytl's in it, so it imports no
    # raytl (nor timm, nor scikit-learn) before it can start the workers
    assert b"raytl" not in cloudpickle.dumps(trainer.train_run_context)
    # the training function, which only the workers unpickle, carries the whole context
    train_fn = cloudpickle.loads(cloudpickle.dumps(trainer.train_loop_per_worker))
    assert train_fn.func is raytl.trial.enter_workers and train_fn.args == (ctx,)


def test_a_worker_starts_without_importing_scikit_learn(tmp_path, monkeypatch):
    """A Train worker gets its units cut by the driver (``SearchInputs.units``): unpickling its
    training function, in a fresh process, imports neither scikit-learn nor SciPy."""
    monkeypatch.setattr(raytl.trial, "TuneReportCallback", UserCallback)
    inputs = SearchInputs(parse_space(SPACE), "data-ref", str(tmp_path), units="units-ref")
    ctx = TrialContext.create(inputs, {})
    assert ctx.units == "units-ref"
    train_fn = raytl.trial.make_trainer(ctx, "t").train_loop_per_worker
    then = "import raytl.train_loop  # what entering the function imports\n"
    assert imported_after_unpickling(train_fn, then, ("sklearn", "scipy"), tmp_path) == []


def test_the_tune_trials_process_imports_neither_timm_nor_torchvision(tmp_path):
    """What Tune's trial actor unpickles (the trainable, the search's inputs) and builds (the
    trial's context) imports no unit trainer: a trial that runs a worker group starts a new Tune
    process every trial, and timm with torchvision's ops cost it 1.4 s of CPU and 185 MB; a head-only
    trial imports them when it trains (``raytl.trial.train_loop``)."""
    inputs = SearchInputs(parse_space(SPACE), "data-ref", str(tmp_path), units="units-ref")
    then = (
        "run_trial, inputs = loaded\n"
        "from raytl.trial import TrialContext\n"
        "ctx = TrialContext.create(inputs, {'strategy': 'fine_tune'})\n"
        "assert not ctx.lean\n"
    )
    heavy = ("timm", "torchvision", "torch._dynamo", "raytl.unit", "sklearn", "optuna")
    assert imported_after_unpickling((raytl.trial.run_trial, inputs), then, heavy, tmp_path) == []


def test_local_ray_gets_the_train_settings_but_the_environment_wins(monkeypatch):
    for key in LOCAL_TRAIN_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    with local_train_settings():
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"  # the user's own value
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # put back as it was


def test_the_startup_trace_is_written_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(STARTUP_TRACE, raising=False)
    trace_startup("trial_entered", 1.0)  # unset: nothing is written, nothing fails
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(STARTUP_TRACE, str(path))
    trace_startup("trial_entered", 1.0, process=process_started())
    trace_startup("ready", 1.0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [m["stage"] for m in lines] == ["trial_entered", "ready"]
    assert all(m["trial"] == 1.0 and m["pid"] == os.getpid() for m in lines)
    assert lines[0]["process"] <= lines[0]["time"] <= time.time()


def test_a_local_ray_session_waits_for_its_processes_then_removes_its_folder(monkeypatch):
    """Every process of the local Ray (its own children and what they started) has exited when
    ray_session returns, and its temp folder is gone; another child of this process is not
    Ray's and is neither counted nor waited for. Its workers get the local settings."""
    for key in LOCAL_TRAIN_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with ray_session(None):
            folder = os.environ["RAY_TMPDIR"]
            seen = ray.get(ray.remote(lambda: os.environ.get("GOMP_SPINCOUNT")).remote())
            assert seen == LOCAL_TRAIN_SETTINGS["GOMP_SPINCOUNT"]  # a worker process, too
            started = ray_processes(folder)
        assert started and other.pid not in started
        assert not os.path.exists(folder)
        still = [pid for pid in started if is_running(pid)]
        assert not still, [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in still]
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_checkpoints_are_staged_in_the_local_rays_folder(tmp_path, monkeypatch):
    """A worker killed mid-report leaves its staged checkpoint in the local Ray's folder, which
    the session removes; without one (a cluster's worker) the system's temp folder is used."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert raytl.train_loop.checkpoint_staging() == str(tmp_path)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "not-on-this-node"))
    assert raytl.train_loop.checkpoint_staging() is None
    monkeypatch.delenv("RAY_TMPDIR")
    assert raytl.train_loop.checkpoint_staging() is None


def test_prestarting_is_off_outside_the_local_ray(monkeypatch):
    monkeypatch.delenv(warm_workers.ENABLED, raising=False)
    assert warm_workers.worker_runtime_env() == {}  # Ray's default: Train's own runtime env
    assert warm_workers.prestart_successor(parse_space(SPACE)) is False


def test_workers_are_prestarted_only_where_the_trials_leave_a_cpu_free():
    assert warm_workers.leaves_a_cpu(2, trials_at_once=1, cpus_per_trial=1.0)
    assert not warm_workers.leaves_a_cpu(2, trials_at_once=2, cpus_per_trial=1.0)  # quickstart
    assert not warm_workers.leaves_a_cpu(16, trials_at_once=4, cpus_per_trial=4.0)
    assert warm_workers.leaves_a_cpu(16, trials_at_once=1, cpus_per_trial=2.0)  # a GPU trial


def test_no_process_is_prestarted_for_a_search_that_trains_only_heads_on_cached_features():
    probes = {**SPACE, "space": {"strategy": "linear_probe"}}
    assert not warm_workers.runs_train_workers(parse_space(probes))
    assert warm_workers.runs_train_workers(parse_space({**probes, "cache": "off"}))
    mixed = {**SPACE, "space": {"strategy": {"choice": ["linear_probe", "lp_ft"]}}}
    assert warm_workers.runs_train_workers(parse_space(mixed))
    assert warm_workers.runs_train_workers(parse_space(SPACE))


def test_every_trials_worker_starts_in_a_prestarted_process_with_its_imports_done(
    tmp_path, monkeypatch
):
    """On the local Ray raytl starts, the driver asks for processes for the first trial's Train
    controller and worker before Tune launches it, and that worker asks for one like its own and
    one like its controller's: both trials' workers and controllers start in a process started
    before their trial, the workers' with torch and timm imported, the controllers' with torch
    and Ray Train (and no helper actor's process imports them)."""
    for key in LOCAL_TRAIN_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(STARTUP_TRACE, str(trace))  # Ray's processes inherit it
    config = parse_space(
        {
            "name": "warm",
            "data": {"source": "digits", "image_size": 32, "limit": 120, "seed": 0},
            "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
            "scheme": {"kind": "holdout"},
            "search": {"num_samples": 2, "max_concurrent": 1, "max_epochs": 1, "seed": 0}
            | {"scheduler": "fifo", "seed_configs": []},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
            "space": {"strategy": "fine_tune", "freeze_depth": 3},
        }
    )
    out = tmp_path / "out"

    def not_here(*args):  # gRPC channels stay out of the driver's process (raytl/raylet.py)
        raise AssertionError("the driver called the raylet itself")

    # in this process only (the Ray workers import their own)
    monkeypatch.setattr(ray._private.grpc_utils, "init_grpc_channel", not_here)
    with ray_session(None):
        inputs = share_inputs(config, config.data.load(), out, lambda line: None)
        table = tune_search(inputs, out, resume=False, echo=lambda line: None)
        controller_env, worker_env = warm_workers.train_envs()
        launched = {w.pid: w.worker_launch_time_ms / 1000 for w in list_workers(detail=True)}
        controllers = list_actors(filters=[("class_name", "=", "TrainController")], detail=True)
        actors = list_actors(detail=True, limit=1000)
    assert len(table) == 2
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    workers = lines
    workers = sorted(
        (w for w in workers if w["stage"] == "worker_entered"), key=lambda w: w["trial"]
    )
    assert len(workers) == 2
    for worker in workers:  # started before its trial (cold, it would start after), preloaded
        assert worker["process"] < worker["trial"] and worker["preloaded"] is not None, worker
    # the driver's guess of the workers' runtime env was the env each worker had
    assert {w["runtime_env"] for w in workers} == {worker_env}
    assert warm_workers.controller_env_of(worker_env) == controller_env
    # each trial's Train controller, too, started in a process started before its trial
    started = sorted(launched[c.pid] for c in controllers)
    assert len(started) == 2
    assert all(s < w["trial"] for s, w in zip(started, workers, strict=True)), (started, workers)
    # the second trial's worker began its imports before its trial started; whether they were
    # done by then depends on how long the first trial trained (here about a second) and on how
    # soon the next trial launches (sooner since its Tune process imports no timm: 570e872)
    assert workers[1]["process"] < workers[1]["trial"] and workers[1]["preloaded"] is not None
    # each controller's process took a claim: it imported torch and Ray Train before it took
    # work (its hook), in a process started before its trial (how far the imports had got when
    # the trial started is timing: the first trial launches right after the driver's request)
    claims = {line["pid"]: line for line in lines if line["stage"] == "claim_preloaded"}
    in_order = sorted(controllers, key=lambda c: launched[c.pid])
    for controller, worker in zip(in_order, workers, strict=True):
        assert claims[controller.pid]["process"] < worker["trial"], (claims, controller.pid)
    # and no other actor's process did (the helpers sharing their runtime env, Tune's actors);
    # the process asked for by the last trial, for a controller that never came, did
    others = {a.pid for a in actors if a.class_name != "TrainController"}
    assert not others & set(claims), (claims, actors)


def test_a_claim_is_taken_by_one_process_with_its_variables_once_and_expires(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    env = '{"env_vars":{"A":"1","B":"2"}}'
    controller = {"A": "1", "B": "2", "PATH": "/bin"}  # its variables, and the raylet's
    assert preload_claims.take_claim(controller) is None  # none left: no import
    assert preload_claims.leave_claims(env, ["json", "csv"], count=2) == 2
    assert preload_claims.take_claim({"A": "1", "PATH": "/bin"}) is None  # another env's process
    assert preload_claims.take_claim({"A": "1", "B": "3"}) is None
    assert preload_claims.take_claim(controller) == ["json", "csv"]
    later = time.time() + preload_claims.CLAIM_TTL_S + 1
    assert preload_claims.take_claim(controller, now=later) is None
    assert preload_claims.take_claim(controller) is None  # the expired one was removed, not left
    assert list((tmp_path / preload_claims.FOLDER).iterdir()) == []
    monkeypatch.delenv("RAY_TMPDIR")
    assert preload_claims.leave_claims(env, ["json"]) == 0  # no local Ray: nothing to claim
