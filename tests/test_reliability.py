"""Real faults, injected: a killed Train worker, a killed driver then `raytl resume`, a worker node
removed mid-search, a pickle in a checkpoint, and many more trials than slots."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import remove_ray_temp_of

SPACE = {
    "name": "faults",
    "data": {"source": "digits", "image_size": 48, "limit": 400, "test_fraction": 0.2},
    "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
    "scheme": {"kind": "holdout"},
    "search": {
        "num_samples": 6,
        "max_concurrent": 1,
        "max_epochs": 2,
        "scheduler": "fifo",
        "seed": 7,
    },
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    "space": {
        "strategy": {"choice": ["linear_probe", "fine_tune"]},
        "freeze_depth": {"int": [5, 7], "when": {"strategy": ["fine_tune"]}},
        "head_lr": {"loguniform": [3.0e-3, 3.0e-2]},
        "backbone_lr": {"loguniform": [3.0e-4, 3.0e-3], "when": {"strategy": ["fine_tune"]}},
        "batch_size": 32,
    },
}


def _write(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _raytl(
    *args: str, stderr: int = subprocess.STDOUT, env: dict[str, str] | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "raytl", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
        env=None if env is None else {**os.environ, **env},
    )


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
    """Read the process's output until a line matches; the lines read so far."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(lines[-30:])}")


def _kill_train_workers_after(driver: subprocess.Popen, pattern: str) -> list[str]:
    """kill -9 the Ray Train workers of this driver's own Ray (its session: the driver runs in a
    new session, and the Ray it starts, workers included, stays in it) once the driver prints a
    line matching ``pattern``. Nobody else's Ray is touched."""
    import psutil

    lines = _read_until(driver, pattern, timeout=600)
    workers = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            mine = os.getsid(proc.pid) == driver.pid
        except (ProcessLookupError, PermissionError):
            continue
        if mine and any("ray::RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            workers.append(proc.pid)
    assert workers, "no Ray Train worker process of this search found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    return lines


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _drain(proc: subprocess.Popen, into: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(proc.stdout), daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("max_concurrent", [1, 2])
def test_killed_driver_then_resume_keeps_every_trial_and_the_searcher_state(
    tmp_path, max_concurrent
):
    # quick trials: linear probes on cached features (one converged report each), sampled by the
    # searcher alone (no seeded recipes), so the study's state is what the resume must keep
    search = {**SPACE["search"], "max_concurrent": max_concurrent, "seed_configs": []}
    space = _write(
        tmp_path,
        {**SPACE, "search": search, "space": {**SPACE["space"], "strategy": "linear_probe"}},
    )
    out = tmp_path / "out"
    # Tune snapshots its experiment state at most every 10 s by default, so a trial of a second
    # or two (a cached linear probe) can start and end between two snapshots: after a crash it is
    # unknown and another trial runs in its place (what max_concurrent 2 runs into, below). With
    # one at a time a snapshot at every step makes the case this test is about certain: the
    # fourth trial saved as started, not yet as finished.
    every_step = {"TUNE_GLOBAL_CHECKPOINT_S": "0"} if max_concurrent == 1 else None
    driver = _raytl("search", str(space), "--output", str(out), env=every_step)
    # kill it the moment the fourth trial reports (its only, last epoch): three trials are finished, the
    # fourth has written its final checkpoint but Tune has not yet saved it as finished, so the
    # resume must close that trial from its checkpoint without training it again; with two at
    # once, a fifth is mid-way and must go on from its own checkpoint (or start over), once
    _read_until(driver, r"epoch 1/1 .*\| 3/6 done", timeout=600)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    remove_ray_temp_of(driver.pid)  # SIGKILL left it behind
    assert not (out / "results.parquet").exists()  # it died before writing them

    resumed = subprocess.run(
        [sys.executable, "-m", "raytl", "resume", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the search" in resumed.stdout
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 6 and results["trial_id"].is_unique  # none lost, none duplicated
    assert set(results["status"]) == {"completed"}
    assert (results["epochs"] == 1).all()
    # the Optuna study came back with the trials from before the kill, so the trials sampled
    # after it were TPE-guided by them (ray-project/ray#30861 once lost this state)
    import cloudpickle

    states = sorted((out / "ray" / "tune").glob("searcher-state-*.pkl"))
    assert states, "Tune saved no searcher state"
    with states[-1].open("rb") as f:
        searcher = cloudpickle.load(f)
    study = searcher["_ot_study"] if isinstance(searcher, dict) else searcher._ot_study
    told = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(told) == 6
    assert sorted(round(t.params["head_lr"], 12) for t in told) == sorted(
        round(v, 12) for v in results["head_lr"]
    )
    # the learning curves keep every epoch, those Tune had not saved before the kill included
    history = pd.read_parquet(out / "history.parquet")
    assert history.groupby("trial_id")["epoch"].apply(list).to_dict() == {
        t: [1] for t in results["trial_id"]
    }
    # TensorBoard has one run per trial after the resume, too; with two at once, a trial that
    # started after Tune's last saved state (so the resume ran another in its place: either of
    # the two running at the kill) keeps its run, ended as lost (status -1), never passing for a
    # finished trial; one that finished just before the kill logged that first (its status then
    # reads 2, then -1: the run's last word, what the HParams dashboard shows, is lost)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {p.name for p in (out / "tensorboard").iterdir() if p.name.startswith("trial_")}
    assert runs >= {f"trial_{t}" for t in results["trial_id"]}
    lost = runs - {f"trial_{t}" for t in results["trial_id"]}
    assert len(lost) <= (0 if every_step else max_concurrent)
    for run in lost:
        events = EventAccumulator(str(out / "tensorboard" / run))
        events.Reload()
        assert [e.value for e in events.Scalars("final/status")] in ([-1.0], [2.0, -1.0])


def test_attempt_clock_keeps_the_first_attempt_and_counts_restarts(tmp_path):
    from raytl.attempts import AttemptClock, save_checkpoint_meta
    from raytl.train_loop import resume_attempt

    class Checkpoint:  # the interface of ray.train.Checkpoint that resume_attempt uses
        def __init__(self, folder):
            self.folder = folder

        def as_directory(self):
            return contextlib.nullcontext(str(self.folder))

    first = resume_attempt(None, {}, "cpu", entered=100.0, startup_seconds=20.0)
    assert first.restart_startup_seconds != first.restart_startup_seconds  # NaN: not a restart
    assert first.clock.restarts == 0 and first.clock.startup_seconds == 20.0
    assert first.last_report is None
    saved = AttemptClock(worker_seconds=12.5, startup_seconds=20.0, ready_at=first.clock.ready_at)
    report = {
        "epoch": 2,
        "total_epochs": 2,
        "val_accuracy": 0.75,
        "val_loss": float("nan"),
        "restarts": 0,
    }
    save_checkpoint_meta(tmp_path, saved, [{"epoch": 1, "val_accuracy": 0.5}], report)
    entered = time.time() - 3.0
    again = resume_attempt(Checkpoint(tmp_path), {}, "cpu", entered=entered, startup_seconds=99.0)
    assert again.clock == AttemptClock(12.5, 20.0, first.clock.ready_at, restarts=1)
    assert 3.0 <= again.restart_startup_seconds < 10.0
    # a trial resumed from its final checkpoint (the driver died before Tune saw it end) reports
    # that checkpoint's metrics once more, with this attempt's restart count
    resent = again.report_again()
    assert resent["val_accuracy"] == 0.75 and resent["epoch"] == 2 and resent["restarts"] == 1
    assert json.loads(resent["resumed_history"]) == [{"epoch": 1, "val_accuracy": 0.5}]
    again.clock.save(tmp_path)
    assert (
        resume_attempt(
            Checkpoint(tmp_path), {}, "cpu", entered=entered, startup_seconds=0.0
        ).clock.restarts
        == 2
    )


@pytest.mark.slow
def test_a_killed_train_worker_resumes_from_its_checkpoint(tmp_path):
    """kill -9 the Ray Train worker of a running fine-tuning trial after its first epoch."""
    raw = {
        **SPACE,
        "search": {**SPACE["search"], "num_samples": 1, "max_epochs": 3},
        "space": {
            "strategy": "fine_tune",
            "freeze_depth": 6,
            "head_lr": 0.01,
            "backbone_lr": 0.001,
            "batch_size": 32,
        },
    }
    space, out = _write(tmp_path, raw), tmp_path / "out"
    driver = _raytl("search", str(space), "--output", str(out))
    lines = _kill_train_workers_after(driver, r"epoch 1/3")
    thread = _drain(driver, lines)
    assert driver.wait(timeout=900) == 0, "".join(lines[-40:])
    thread.join(timeout=10)
    results = pd.read_parquet(out / "results.parquet")
    assert list(results["status"]) == ["completed"] and int(results["epochs"].iloc[0]) == 3
    history = pd.read_parquet(out / "history.parquet")
    assert list(history["epoch"]) == [1, 2, 3]  # each epoch once, the restart went on from 1
    # the restart resumed from the epoch-1 checkpoint rather than starting over
    epochs = [int(m) for m in re.findall(r"epoch (\d)/3", "".join(lines))]
    assert epochs.count(1) == 1 and epochs[-1] == 3
    # costs per attempt: the first attempt's start-up stays the trial's, the restart is counted
    row = results.iloc[0]
    assert row["restarts"] == 1
    assert 0 < row["restart_startup_seconds"] < row["trial_seconds"]
    assert 0 < row["startup_seconds"] <= row["overhead_seconds"] < row["trial_seconds"]


@pytest.mark.slow
def test_a_worker_node_removed_mid_search_the_search_completes(tmp_path, restores_shared_ray_temp):
    import ray
    from ray.cluster_utils import Cluster

    from raytl.cluster import free_port
    from raytl.search import run_search
    from raytl.space_file import parse_space

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        raw = {
            **SPACE,
            "data": {**SPACE["data"], "limit": 1000},  # epochs long enough to remove a node in
            "search": {
                **SPACE["search"],
                "num_samples": 3,
                "max_concurrent": 1,
                "max_epochs": 3,
                "storage": str(tmp_path / "shared"),
            },
            "space": {
                "strategy": "fine_tune",
                "freeze_depth": {"int": [5, 7]},
                "head_lr": 0.01,
                "backbone_lr": 0.001,
                "batch_size": 32,
            },
        }
        storage = tmp_path / "shared"
        removed: list[str] = []

        def remove_the_node_of_a_checkpointed_trial() -> None:
            """Kill (no graceful drain) the node that runs the Train worker of the trial that has a
            registered checkpoint and is not finished: one trial runs at a time, so that trial's
            worker is the only live one, and its node is known from Ray's own state. Tried
            again until it holds (the State API may be slow to answer on a loaded machine)."""
            from ray.util.state import list_actors

            def mid_trial() -> list[Path]:
                """The running trial, once Train has registered a checkpoint of it (in its
                snapshot: a checkpoint folder alone may not be registered yet, and a worker lost
                before that restarts from scratch) and before its last epoch's is written."""
                return [
                    d
                    for d in storage.glob("*/train_*")  # the run's folder, then the trial's
                    if "checkpoint_epoch_" in _text(d / "checkpoint_manager_snapshot.json")
                    and not (d / "checkpoint_epoch_0003").exists()
                ]

            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if mid_trial():
                    try:
                        workers = list_actors(
                            address=cluster.address,
                            filters=[
                                ("class_name", "=", "RayTrainWorker"),
                                ("state", "=", "ALIVE"),
                            ],
                            timeout=10,
                        )
                    except Exception:  # the State API timed out: look again
                        continue
                    nodes = {w.node_id for w in workers}
                    doomed = [n for n in cluster.worker_nodes if n.node_id in nodes]
                    if len(doomed) == 1 and mid_trial():
                        cluster.remove_node(doomed[0], allow_graceful=False)
                        removed.append(doomed[0].node_id)
                        return
                time.sleep(0.2)

        watcher = threading.Thread(target=remove_the_node_of_a_checkpointed_trial, daemon=True)
        watcher.start()
        (tmp_path / "out").mkdir()
        table = run_search(
            parse_space(raw, "faults.yaml"),
            tmp_path / "out",
            address=cluster.address,
            echo=lambda line: None,
        )
        watcher.join(timeout=5)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, "the node was never removed"
    assert len(table) == 3 and table["trial_id"].is_unique  # no trial lost, none duplicated
    assert set(table["status"]) == {"completed"}, table[["status", "error"]]
    assert (table["epochs"] == 3).all()
    # the trial on the removed node went on from its checkpoint on the other node
    assert table["restarts"].sum() >= 1, table[["trial_id", "restarts"]]


def test_a_checkpoint_holding_a_pickle_payload_is_refused(tmp_path):
    """Unit checkpoints load with weights_only=True: an arbitrary object is not executed."""
    from raytl.errors import RaytlError
    from raytl.models import load_checkpoint_weights

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "unit_0.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "evil": Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        torch.load(path, weights_only=True)
    with pytest.raises(RaytlError, match="not a plain state dict"):
        load_checkpoint_weights(torch.nn.Linear(1, 1), path)
    # the way a restarted trial reads its units back: the trial's own checkpoint loader
    from raytl.train_loop import resume_attempt

    class Checkpoint:  # the interface of ray.train.Checkpoint that resume_attempt uses
        def as_directory(self):
            return contextlib.nullcontext(str(tmp_path))

    class Unit:  # what resume_attempt hands the loaded state to
        def load_state_dict(self, state):
            raise AssertionError("the payload was loaded")

    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        resume_attempt(
            Checkpoint(), {0: Unit()}, torch.device("cpu"), entered=0.0, startup_seconds=0.0
        )
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_fifty_trials_on_two_slots_all_accounted_for(tmp_path):
    """Many more trials than slots (cached linear probes, so it stays small but real)."""
    raw = {
        **SPACE,
        "data": {**SPACE["data"], "limit": 300},
        "search": {
            "num_samples": 50,
            "max_concurrent": 2,
            "max_epochs": 1,
            "scheduler": "fifo",
            "seed": 3,
        },
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "space": {
            "strategy": "linear_probe",
            "head_lr": {"loguniform": [1.0e-3, 3.0e-2]},
            "batch_size": 32,
        },
    }
    space, out = _write(tmp_path, raw), tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "raytl", "search", str(space), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 50 and results["trial_id"].is_unique
    assert set(results["status"]) == {"completed"} and results["head_only"].all()
    runs = [p for p in (out / "tensorboard").iterdir() if p.name.startswith("trial_")]
    assert len(runs) == 50


@pytest.mark.slow
def test_a_search_whose_every_trial_fails_keeps_its_results_and_says_so(tmp_path):
    """No retries (max_failures 0) and the only trial's Train worker killed: the search still writes
    results.parquet with the trial's error, then exits 2 with one line, no traceback."""
    raw = {
        **SPACE,
        "search": {**SPACE["search"], "num_samples": 1, "max_epochs": 3, "max_failures": 0},
        "space": {
            "strategy": "fine_tune",
            "freeze_depth": 6,
            "head_lr": 0.01,
            "backbone_lr": 0.001,
            "batch_size": 32,
        },
    }
    space, out = _write(tmp_path, raw), tmp_path / "out"
    driver = _raytl("search", str(space), "--output", str(out), stderr=subprocess.PIPE)
    lines = _kill_train_workers_after(driver, r"epoch 1/3")
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 2, "".join(lines) + stdout[-2000:] + stderr[-3000:]
    # Ray Tune logs the trial's own traceback as it fails; raytl's exit is one line after it
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("raytl: error: every trial failed (1 of 1)"), stderr[-3000:]
    assert "results.parquet" in last
    results = pd.read_parquet(out / "results.parquet")
    assert list(results["status"]) == ["error"] and results["error"].notna().all()
    assert int(results["epochs"].iloc[0]) == 1  # what it had trained is kept


def test_resume_loads_no_pickle_that_others_could_have_written(tmp_path):
    """Resuming unpickles tuner.pkl and the searcher's state: a shared or foreign folder, or a
    URI the user has not vouched for, is refused before anything is loaded."""
    from raytl.errors import RaytlError
    from raytl.tune import check_trusted

    experiment = tmp_path / "tune"
    experiment.mkdir(mode=0o755)
    (experiment / "tuner.pkl").write_bytes(b"pickle")
    (experiment / "tuner.pkl").chmod(0o644)
    check_trusted(str(experiment), trust_storage=False)  # the user's own, writable by them alone
    (experiment / "tuner.pkl").chmod(0o666)
    with pytest.raises(RaytlError, match="tuner.pkl: resuming unpickles.*others can write it"):
        check_trusted(str(experiment), trust_storage=False)
    (experiment / "tuner.pkl").chmod(0o644)
    experiment.chmod(0o777)
    with pytest.raises(RaytlError, match="refusing to load it"):
        check_trusted(str(experiment), trust_storage=False)
    experiment.chmod(0o755)
    with pytest.raises(RaytlError, match="--trust-storage"):
        check_trusted("s3://bucket/runs/x/tune", trust_storage=False)
    check_trusted("s3://bucket/runs/x/tune", trust_storage=True)
