"""Start-up of a trial: where the seconds go between Tune launching a 1-worker fine-tuning trial
and its first training step, stage by stage.

    .venv/bin/python benchmarks/startup.py                  # this checkout: 3 trials (~2 min)
    .venv/bin/python benchmarks/startup.py --before REF     # and the code at REF (or a folder)
    .venv/bin/python benchmarks/startup.py --variants       # and two mechanisms that were tried

Each run is a real search in a fresh process, as ``raytl search`` runs one (a raytl-started local
Ray, ``search.share_inputs`` + ``search.tune_search``; no refit): digits at 32 px, 300 images,
holdout, ``fine_tune`` fixed, 1 epoch (``--epochs``), 3 trials one at a time, 1 worker x 1 CPU,
no seeded recipes. The stages come from two clocks that need nothing but the run itself: Ray's
task timeline (``ray.timeline()``: when the Train controller and worker actors run their
methods) and raytl's start-up trace (``RAYTL_STARTUP_TRACE``,
:func:`raytl.startup_trace.trace_startup`), joined with the results table's ``launched_at``
(the driver's clock when Tune launched the trial). A code
older than the trace shows only the timeline's stages. Each stage is the median over the trials
(each trial's figure in brackets); the imports are timed separately, in fresh processes.

``--variants`` adds two runs of this checkout: with ``RAY_preload_python_modules`` (every Python
worker Ray starts imports torch, timm and raytl.trial first) and with Tune's ``reuse_actors``
(one Tune trial process for consecutive trials; ``raytl.tune`` does not set it).

Writes the "## Trial start-up" section of docs/benchmarks.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from strategies import provenance, write_section  # noqa: E402
from stream import busy_seconds, wait_quiet  # noqa: E402

HEADING = "## Trial start-up (`benchmarks/startup.py`)"


@dataclass(frozen=True)
class Run:
    """One column of the table: a checkout, run with extra environment or Tune's reuse_actors."""

    name: str
    code: Path
    env: dict[str, str] = field(default_factory=dict)
    reuse_actors: bool = False


SPACE: dict[str, Any] = {
    "name": "startup",
    "data": {"source": "digits", "image_size": 32, "limit": 300, "seed": 0},
    "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
    "scheme": {"kind": "holdout"},
    "search": {
        "num_samples": 3,
        "max_concurrent": 1,
        "max_epochs": 1,
        "scheduler": "fifo",
        "seed": 0,
        "seed_configs": [],
    },
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    "space": {"strategy": "fine_tune", "freeze_depth": 3, "head_lr": 0.01, "backbone_lr": 0.001},
}
# (label, start, end): each stage runs from one event to the next, so the stages add up to the
# launch-to-first-step total (a missing event merges its stage into the next)
STAGES = [
    ("Tune starts the trial's actor, `run_trial` entered", "launched", "trial_entered"),
    ("`run_trial`: context, `TorchTrainer` built, `fit()` called", "trial_entered", "fit_called"),
    ("controller actor: a process started for it", "fit_called", "controller_init"),
    (
        "controller: its arguments unpickled (imports), `__init__`",
        "controller_init",
        "controller_ready",
    ),
    (
        "controller: placement group, helper actors, worker process",
        "controller_ready",
        "worker_init",
    ),
    ("worker: run context unpickled (imports)", "worker_init", "context_done"),
    ("worker: torch.distributed set-up (gloo `init_process_group`)", "context_done", "torch_done"),
    (
        "worker: train function launched, `train_loop_per_worker` entered",
        "torch_done",
        "worker_entered",
    ),
    ("worker: `ray.get` of the data (and features), units", "worker_entered", "data_fetched"),
    ("worker: `UnitTrainer` (model build, weights load)", "data_fetched", "trainers_built"),
    ("worker: checkpoint check; first training step starts", "trainers_built", "ready"),
]
IMPORTS = ["torch", "ray.train.torch", "ray.tune", "raytl.trial", "timm", "raytl.train_loop"]
"""In this order: what the Tune trial's process imports (to ``raytl.trial``), then what a Train
worker adds (``raytl.train_loop``, where the code has it)."""
PRELOAD = {"RAY_preload_python_modules": "torch,timm,raytl.trial"}
GOAL_SECONDS = 5.0  # issue 15, item 7: launch to first training step of a 1-worker trial
WHY = [  # checked against Ray 2.60's source (ray/train/v2, ray/_private/workers/default_worker.py)
    "- Why every trial pays it: Ray Train V2 starts a trial's controller and workers as new "
    "actors, and every actor gets a new Python process (7 per trial here: the Tune trial, its "
    "report queue, the Train controller, the placement-group cleaner, the synchronization "
    "actor, the dataset manager and the worker; 8 with the preemption watcher). Ray's own pool "
    "of idle processes cannot serve them: it is filled once (as many as CPUs, when the first "
    "driver connects) and only with an empty runtime env, Train V2 gives its controller and "
    "workers a runtime env of their own (`env_vars`, always), and a process that ran a task is "
    "not handed to an actor (both checked on this machine).",
    "- Cut (raytl/warm_workers.py, the local Ray raytl starts; 2026-12-01): processes started "
    "ahead for the trials' Train controllers and workers, by the raylet (`PrestartWorkers`, the "
    "call Ray's core worker makes; Ray 2.60 has no Python API for it), for this job and the "
    "runtime env each will have; a worker's setup hook imports torch, timm, Ray Train and raytl "
    "before the process takes work (a controller's runtime env is Train's own: its process was "
    "started, its imports were not done, until the next item). The driver asks for the first "
    "trials' processes before Tune launches them, each Train worker for its successor's (and, rank 0, for the next "
    "controller's). The raylet matches a hash of the runtime env's JSON as Ray's C++ merge wrote "
    "it: the driver computes it from the variables Tune and Train propagate, a worker sends its "
    "own (the test checks they are the same). Test: "
    "`test_every_trials_worker_starts_in_a_prestarted_process_with_its_imports_done`. "
    "Only where the search's trials leave a CPU free: the quickstart (2 trials at once on 2 "
    "cores) took 215 s with it and 192 s without (`benchmarks/quickstart.py`, one run each, "
    "2026-12-01, 07ab5d2 and the same with `RAYTL_WARM_TRAIN_WORKERS=0`): a process prestarted "
    "while every core trains takes its imports' seconds from the running trials, whereas a cold "
    "worker imports while its own trial waits anyway. The steps, 2026-12-01, each "
    "`--before 1418573 --searches 2` (medians: all trials, first of each search, later ones): "
    "later trials' workers only (20348a1) 5.4 / 10.2 / 5.3 s; the first trials' workers too "
    "(3c3f3b4) 5.3 / 5.8 / 5.0; controllers too, the next one asked for as each worker started "
    "(fd85bf5) 5.1 / 6.2 / 5.0 (the controller's process 1.2 -> 0.7 s, but the worker's model "
    "build 0.2 -> 0.8 s, two processes starting beside it); asked for when rank 0's training is "
    "done (613bf4f) 4.3 / 5.0 / 4.0; the driver's request made by a task, not the driver "
    "(508f4b1, the table above; the same mechanism, the first trial's processes asked for a "
    "little later).",
    "- Cut (raytl/trial.py): the trial's `TrialContext` travels bound into the training "
    "function (`functools.partial`), which only the workers unpickle, instead of "
    "`train_loop_config`, which is part of the run context the controller unpickles too: the "
    "controller imported raytl, timm and scikit-learn just to start the workers (its second "
    "row). The workers import what they did before, now when they unpickle the function.",
    "- Cut (raytl/trial.py, raytl/data/splits.py, raytl/schemes.py; 2026-12-01): the driver "
    "cuts the scheme's units once per search (`trial.with_units`, into the object store) and "
    "the workers read them instead of cutting them again, and scikit-learn's splitters are "
    "imported where they cut: a worker imports neither scikit-learn nor SciPy (`raytl.trial` "
    "took 0.92 s to import after torch, timm and Ray Train, 0.07 s now: `python -X importtime`), "
    "nor does the Tune trial's process.",
    "- Cut (raytl/cluster.py, the local Ray raytl starts, where the environment does not set "
    "them): `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`, one process fewer per trial, whose start "
    "competed with the worker's imports on 2 cores (a Ray on one machine is never drained); "
    "`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5` (Ray: 2): the controller sees reports and the end "
    "of the trial at its next poll, about 2 s less per trial (after start-up). A cluster "
    "(`--address`) keeps its own settings: set the interval in its nodes' environment.",
    "- Tried, no help: `RAY_preload_python_modules` (`+ preload`, with `--variants`): the "
    "raylet imports them in each Python worker it starts, before it takes work, so for the "
    "fresh processes above it only moves the worker's imports before its `__init__` and adds "
    "them to every helper actor's process. Caching the model per worker process: the process "
    "is new every trial, and the build takes 0.1 s.",
    "- Not in raytl (raytl/tune.py): Tune's `reuse_actors=True` (`+ reuse_actors`) keeps the "
    "Tune trial's process for the next trial, whose launch then follows the previous trial's "
    "end at once; it does not change the start-up itself. Tried in raytl (2026-11-30, commit "
    "5a3a365) and taken out again (the commit after): in a quickstart search it deadlocked. "
    "Tune reuses the trial's process only if the previous trial's thread ends within "
    '`TUNE_FUNCTION_THREAD_TIMEOUT_S` (2 s); when it does not, the reset fails ("Could not '
    're-use actor ... reset_config() ... return True", in ray-output.log), and a later '
    "trial's Train controller then waited forever in `TuneReportCallback.after_report`, "
    "putting a report into Tune's report queue that no thread read (py-spy of the controller; "
    "the worker idle, the search stalled for minutes). The kill-resume and Tune tests had "
    "passed with it, so the failure depends on timing: not safe to turn on.",
    "- Other Train V2 settings (environment, ray/train/v2/_internal/constants.py): "
    "`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`, `RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S`, "
    "`RAY_TRAIN_COLLECTIVE_TIMEOUT_S`, `RAY_TRAIN_ENABLE_*_STRUCTURED_LOGGING`, "
    "`RAY_TRAIN_METRICS_ENABLED`, `RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION`: none is on "
    "the start-up path (the placement group is ready in 0.02 s).",
    "- Trial end to the next trial's launch (the table's row): the next Tune trial's own actor. "
    "In one search with `--keep` (2026-12-01, f8156c7), each later trial's actor process started "
    "0.03 s after the previous trial ended (the trace's `trial_entered` process time) and Tune's "
    "launch (its `on_trial_start`, fired once the actor is ready) came 5.2 and 5.4 s later (the "
    "first trial's 4.5 s): the process's Python and Ray start and its loading of the trainable, "
    "which imported `raytl.trial` with torch, timm and Ray Train. The launch-to-first-step total "
    "above does not include it.",
    "- Cut (raytl/trial.py, raytl/train_loop.py, raytl/space_file.py; 2026-12-01, 570e872): the "
    "Tune trial's process imports no timm, torchvision or torch._dynamo when its trial runs a "
    "worker group. The loop that trains the units moved to `raytl.train_loop`, which "
    "`raytl.trial` imports by name when a trial first trains (the workers, preloaded; a probe on "
    "cached features in the Tune process); reading a space file (its checks ask timm) moved out "
    "of `raytl.config`, and each backbone's block count travels in the `SpaceConfig`. Importing "
    "`raytl.trial` in a fresh Python: 4.2-4.6 s of CPU and 840 MB peak resident before (60b1420), "
    "2.8-3.4 s and 655 MB after (three runs each, `resource.getrusage`); the imports table above "
    "(`raytl.trial` 1.88 -> 0.07 s after torch and Ray Train). Measured here (the table, "
    "`--searches 2`): trial end to the next launch 5.0 -> 4.1 s, but launch to first step "
    "5.2 -> 6.1 s and launch to the next launch 13.1 -> 13.5 s: on this 2-core machine, one trial "
    "at a time, the seconds saved before the launch are spent after it. In the kept traces the "
    "trial now launches while the worker process prestarted for it is still importing (the "
    "first trial's worker entered 9.0 s after the launch, its imports done 4.5 s after it; "
    "before, 5.7 and 0.5 s), so the controller's and the worker's imports share the cores. What the cut "
    "saves for certain is each trial's CPU and memory in its Tune process: 1.4 s and 185 MB "
    "per trial, and per trial running at once. The quickstart (2 trials at once on 2 cores, "
    "prestarting off), `raytl search search_spaces/quickstart.yaml` alternated, the same trials "
    "and picks: 234 and 232 s before, 264 and 198 s after: a difference this machine's noise "
    "hides.",
    "- Tried, taken out (ed598a1, reverted in c0d63e6): the next Tune trial's process prestarted "
    "too (no imports: its runtime env is Tune's own), asked for by rank 0 when its training was "
    "done. The process was ready before the previous trial ended, but the launch still came "
    "3.6 s after that end (the actor's imports of torch and Ray Train): trial end to the next "
    "launch 4.3 s against 4.1 without it, launch to the next launch 15.0 against 14.1 s before "
    "either change in the same run (`--searches 3`). No gain, so not kept.",
    "- Cut (raytl/preload_claims.py, the local Ray raytl starts; 2026-12-02, 32be18e): the "
    "controller's process imports torch and Ray Train ahead too. Every Python worker process of "
    "the local Ray runs raytl's setup hook (Ray's `__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR` in "
    "the raylet's environment; a runtime env's own, the Train workers', replaces it), which "
    "imports only where a claim waits: a file the asker leaves in the local Ray's folder beside "
    "its `PrestartWorkers` request, naming the runtime env's variables and the modules, taken "
    "(an atomic rename) by the first process whose environment has those variables. The "
    "controller's helper actors share its runtime env but start after it and find none (the "
    "test checks that no other actor's process imported). Variables, not the runtime env's "
    "text: a process cannot ask Ray for its own runtime env before its first task (Ray's core "
    "worker crashed in `GetCurrentSerializedRuntimeEnv`). The table's before and after columns "
    "are this change (between them only this and the benchmark's `--epochs` option): the "
    "controller's two rows are about 0.1-0.3 s each now (more where the first trial launches "
    "while its controller's process still imports); trial end to the next launch grows, "
    "because the controller's imports now run at the trial's end, beside the next Tune trial's "
    "start, but launch to the next launch shrinks. The same comparison run twice on 2026-12-02 "
    "(medians: all trials, first of each search, later ones; launch to the next launch): at "
    "32be18e 4.9 / 8.8 / 4.5 -> 3.3 / 4.5 / 3.0 s, 11.5 -> 10.8 s; the table, at a slower "
    "moment of this machine (938b0ff itself 7.6 s against 4.9), 7.6 / 10.1 / 6.9 -> 4.5 / 7.2 / "
    "3.7 s, 15.8 -> 13.5 s. The goal holds for the median and the later trials in both; the "
    "first trial of a search met it in the first run, not in the second.",
    "- Tried, not kept (2026-12-02, on top of 32be18e, not committed): the next Tune trial's "
    "process prestarted with a claim to import torch, Ray Train and raytl's trainable (its "
    "runtime env, Tune's, travels in the `TrialContext`; the driver's Python writes that one "
    "with `RuntimeEnv.serialize`, not compact like the C++ merge). Asked for by rank 0 when its "
    "training was done (`--before 32be18e --searches 2`): trial end to the next launch 4.5 -> "
    "3.9 s, but a trial's launch to its end 6.0 -> 6.8 s and launch to the next launch 10.5 -> "
    "10.6 s. Asked for after the first epoch, to overlap the training (`--before 32be18e "
    "--searches 2 --epochs 3`): trial end to the next launch 3.8 -> 0.1 s, but launch to end "
    "9.2 -> 12.5 s, launch to first step 3.6 -> 4.1 s and launch to the next launch 13.0 -> "
    "12.6 s. On 2 cores the imports of three processes a trial (the next worker's, about 4 s "
    "of CPU, the controller's and the Tune trial's, about 2.3 s each) are more than the one "
    "core a trial leaves free can do while a short trial trains: they move, they do not "
    "shrink, and they slow the trial they overlap. Where more cores idle beside a trial (a GPU "
    "node) this would pay; not measurable here, so not kept.",
    "- Left: the Tune trial's own process, new every trial, and its imports of torch and Ray "
    "Train (trial end to the next launch, above); on 2 cores, the first trial of each search, "
    "whose worker, controller and Tune processes all import at the search's start.",
]


# --------------------------------------------------------------------------- one search (child)


def run_search(out: Path, reuse_actors: bool = False) -> None:
    """The search, in this process (the code importable here), into ``out``; ``reuse_actors``:
    with Tune's ``reuse_actors`` (a variant: raytl does not set it)."""
    import functools

    import ray
    from ray import tune

    if reuse_actors:
        tune.TuneConfig = functools.partial(tune.TuneConfig, reuse_actors=True)  # type: ignore

    import raytl
    from raytl.cluster import ray_session
    from raytl.search import share_inputs, tune_search

    # the code measured (PYTHONPATH) may predate raytl.space_file (570e872); the venv's editable
    # install would find this checkout's module of that name, so look in the measured tree
    if (Path(raytl.__file__).parent / "space_file.py").exists():
        from raytl.space_file import parse_space
    else:
        from raytl.config import parse_space  # type: ignore[attr-defined,no-redef]

    os.environ["RAYTL_STARTUP_TRACE"] = str(out / "trace.jsonl")  # Ray's processes inherit it
    config = parse_space(SPACE, "benchmarks/startup.py")
    with ray_session(None):
        inputs = share_inputs(config, config.data.load(), out, lambda line: None)
        table = tune_search(inputs, out, resume=False, echo=lambda line: None)
        timeline = ray.timeline()
    table.to_parquet(out / "trials.parquet")
    (out / "timeline.json").write_text(json.dumps(timeline))


def session_cpu(sid: int) -> dict[int, float]:
    """CPU seconds so far of every process in session ``sid`` (a run's driver and its Ray)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == sid:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError):
            continue  # gone meanwhile
    return out


def search_in(run: Run, out: Path) -> float:
    """:func:`run_search` in a fresh process on the raytl at ``run.code`` (a checkout), after a
    quiet moment; the cores that other processes used meanwhile (this machine may be shared):
    the machine's busy time less that of the run's session, sampled twice a second."""
    out.mkdir(parents=True)
    wait_quiet(limit=0.3, patience=180.0)
    t0, busy0 = time.perf_counter(), busy_seconds()
    flags = ["--reuse-actors"] if run.reuse_actors else []
    flags += ["--epochs", str(SPACE["search"]["max_epochs"])]
    with open(out / "stderr.txt", "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--run-search", str(out), *flags],
            cwd=run.code,
            env={**os.environ, **run.env, "PYTHONPATH": str(run.code)},  # Ray's workers too
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # Ray's processes stay in it: their CPU is the run's own
        )
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        while child.poll() is None:
            for pid, cpu in session_cpu(child.pid).items():
                first.setdefault(pid, cpu if time.perf_counter() - t0 < 0.6 else 0.0)
                last[pid] = cpu
            time.sleep(0.5)
    if child.returncode:
        raise SystemExit(
            f"the search {run.name} failed:\n{(out / 'stderr.txt').read_text()[-3000:]}"
        )
    mine = sum(last[pid] - first[pid] for pid in last)
    return max(0.0, (busy_seconds() - busy0 - mine) / (time.perf_counter() - t0))


# --------------------------------------------------------------------------- stages per trial


def ray_events(out: Path) -> list[tuple[float, float, str]]:
    """(start, end, method) of every actor method in Ray's timeline, wall clock in seconds."""
    events = json.loads((out / "timeline.json").read_text())
    return sorted(
        (e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e.get("cat", ""))
        for e in events
        if e.get("ph") == "X" and e.get("cat", "").startswith("task::")
    )


def trial_events(out: Path) -> list[dict[str, float]]:
    """Each trial's stage times (wall clock), from launch to its first training step."""
    import pandas as pd

    table = pd.read_parquet(out / "trials.parquet").sort_values("launched_at")
    trace: dict[float, dict[str, Any]] = {}
    if (out / "trace.jsonl").exists():
        for line in (out / "trace.jsonl").read_text().splitlines():
            mark = json.loads(line)
            trace.setdefault(mark["trial"], {})[mark["stage"]] = mark
    events = ray_events(out)
    trials: list[dict[str, float]] = []
    for _, row in table.iterrows():
        launched = float(row["launched_at"])
        ready = launched + float(row["overhead_seconds"])
        spans = [e for e in events if launched - 1 <= e[0] <= ready]

        def first(method: str, end: bool = False, spans: list = spans) -> float:
            hits = [e[1] if end else e[0] for e in spans if e[2].endswith(method)]
            return min(hits) if hits else math.nan

        t: dict[str, float] = {
            "launched": launched,
            "trial_entered": first("ImplicitFunc.train"),
            "controller_init": first("TrainController.__init__"),
            "controller_ready": first("TrainController.__init__", end=True),
            "worker_init": first("RayTrainWorker.__init__"),
            "context_done": first("RayTrainWorker.init_train_context", end=True),
            "torch_done": first("execute._setup_torch_process_group", end=True),
            "worker_entered": entered_from_table(row, first("ImplicitFunc.train")),
            "ready": ready,
            "trial_seconds": float(row["trial_seconds"]),
        }
        for key, marks in trace.items():  # the trace's key: the trial's TrialContext.started
            if launched - 1 <= key <= ready:
                t.update({stage: mark["time"] for stage, mark in marks.items()})
                t["worker_process"] = marks.get("worker_entered", {}).get("process", math.nan)
        t["first_in_search"] = float(not trials)
        trials.append(t)
    for this, after in zip(trials, trials[1:], strict=False):
        this["to_next_launch"] = after["launched"] - (this["launched"] + this["trial_seconds"])
    return trials


def entered_from_table(row: Any, trial_called: float) -> float:
    """Where the trace is missing (older code): the worker's entry from the results table's
    start-up seconds, counted from Tune's call of the trainable (where the context is made)."""
    return trial_called + float(row["startup_seconds"])


def stage_seconds(trial: dict[str, float]) -> dict[str, float]:
    """Seconds per stage of one trial (NaN where an event is missing: merged into the next)."""
    out, previous = {}, trial["launched"]
    for label, _start, end in STAGES:
        at = trial.get(end, math.nan)
        out[label] = at - previous if not math.isnan(at) else math.nan
        previous = at if not math.isnan(at) else previous
    out["launch to first training step"] = trial["ready"] - trial["launched"]
    out["worker process started, after `fit()`"] = trial.get(
        "worker_process", math.nan
    ) - trial.get("fit_called", math.nan)
    out["trial end to the next trial's launch"] = trial.get("to_next_launch", math.nan)
    out[trial_row()] = trial["trial_seconds"]
    return out


# --------------------------------------------------------------------------- imports, fresh process


def import_seconds(code: Path, repeats: int) -> dict[str, float]:
    """Median seconds each of :data:`IMPORTS` adds, in order, in a fresh Python (``repeats``)."""
    script = (
        "import importlib, json, time\n"
        f"out = {{}}\nfor name in {IMPORTS!r}:\n"
        "    t = time.perf_counter()\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:  # a module an older commit does not have\n"
        "        out[name] = float('nan'); continue\n"
        "    out[name] = time.perf_counter() - t\n"
        "print(json.dumps(out))"
    )
    runs = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=code,
            env={**os.environ, "PYTHONPATH": str(code)},
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(done.stdout))
    return {name: statistics.median(r[name] for r in runs) for name in IMPORTS}


# --------------------------------------------------------------------------- the section


def median_cell(values: list[float]) -> str:
    real = [v for v in values if not math.isnan(v)]
    if not real:
        return "n/a"
    each = ", ".join(f"{v:.1f}" for v in values if not math.isnan(v))
    return f"{statistics.median(real):.1f} [{each}]"


def seconds_cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def breakdown(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """The table: one row per stage, one column per code (median over its trials)."""
    per_code = {code: [stage_seconds(t) for t in trials] for code, trials in results.items()}
    labels = list(next(iter(per_code.values()))[0])
    lines = [
        "| stage (seconds) | " + " | ".join(per_code) + " |",
        "| --- | " + " | ".join("---:" for _ in per_code) + " |",
    ]
    for label in labels:
        cells = [median_cell([s[label] for s in stages]) for stages in per_code.values()]
        bold = label == "launch to first training step"
        lines.append(f"| {'**' + label + '**' if bold else label} | " + " | ".join(cells) + " |")
    return lines


def epochs() -> str:
    n = SPACE["search"]["max_epochs"]
    return f"{n} epoch" + ("s" if n > 1 else "")


def trial_row() -> str:
    return f"trial, launch to end ({epochs()})"


def section(command: str, results: dict, imports: dict, others: dict) -> str:
    cols = list(imports)
    return "\n".join(
        [
            HEADING,
            "",
            provenance(command),
            "",
            "A search of 3 trials one at a time (digits, 32 px, 300 images, holdout, `fine_tune`, "
            f"{epochs()}, 1 Ray Train worker x 1 CPU, no seeded recipes), each run in a fresh "
            "process with a Ray of its own, after waiting for a quiet moment. Stages are "
            "consecutive (they add up to the total); each cell is the median over the trials, "
            "each trial's figure in brackets. Sources: the results table's `launched_at` and "
            "`overhead_seconds`, Ray's task timeline (the Train controller's and worker's actor "
            "methods) and raytl's start-up trace (`RAYTL_STARTUP_TRACE`); n/a: no such event.",
            "",
            *breakdown(results),
            "| others' CPU during the run (cores of "
            f"{os.cpu_count()}) | "
            + " | ".join(", ".join(f"{o:.2f}" for o in others[c]) for c in results)
            + " |",
            "",
            "Imports in a fresh Python (seconds each adds, in this order; median of 3):",
            "",
            "| module | " + " | ".join(cols) + " |",
            "| --- | " + " | ".join("---:" for _ in cols) + " |",
            *(
                f"| `{name}` | " + " | ".join(seconds_cell(imports[c][name]) for c in cols) + " |"
                for name in IMPORTS
            ),
            "| all | "
            + " | ".join(f"{math.fsum(v for v in imports[c].values() if v == v):.2f}" for c in cols)
            + " |",
            "",
            "Reading:",
            "",
            *reading(results, imports),
            "",
        ]
    )


def median_stage(trials: list[dict[str, float]], label: str) -> float:
    values = [v for v in (stage_seconds(t)[label] for t in trials) if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def reading(results: dict[str, list], imports: dict[str, dict[str, float]]) -> list[str]:
    """What the table says: the totals against the goal, the cuts, and what remains."""
    total, gap = "launch to first training step", "trial end to the next trial's launch"
    lines = []
    for name, trials in results.items():
        first, wait = median_stage(trials, total), median_stage(trials, gap)
        trial = median_stage(trials, trial_row())
        opening = median_stage([t for t in trials if t["first_in_search"]], total)
        later = median_stage([t for t in trials if not t["first_in_search"]], total)
        verdict = {  # judged apart: a median over both hides the first trials
            (True, True): "met",
            (False, True): "met by the later trials, NOT by the first of each search",
        }.get((opening <= GOAL_SECONDS, later <= GOAL_SECONDS), "NOT met")
        warm = sum(t.get("worker_process", math.inf) < t["launched"] for t in trials)
        lines.append(
            f"- {name}: launch to first training step {first:.1f} s (goal <= {GOAL_SECONDS:.0f} s:"
            f" {verdict}); the first trial of each search {opening:.1f} s, the later ones "
            f"{later:.1f} s (medians); {warm} of {len(trials)} workers started in a process "
            f"started before their trial; a trial from its launch to the next one's "
            f"{trial + wait:.1f} s."
        )
    after = [t for name, t in results.items() if not name.startswith("before")][0]
    stage = {label: median_stage(after, label) for label, _, _ in STAGES}
    worker_imports = stage[STAGES[5][0]] + stage[STAGES[7][0]]
    controller = stage[STAGES[2][0]] + stage[STAGES[3][0]]
    code = [c for c in imports if not c.startswith("before")][0]
    lines += [
        f"- What remains (medians over all trials): the controller's process and its "
        f"imports of torch and Ray Train ({controller:.1f} s); the placement group, the helper "
        f"actors and the worker's actor ({stage[STAGES[4][0]]:.1f} s; for a cold worker most "
        f"of it the worker process's own Python and Ray start); the worker's unpickling and "
        f"launch of the training function ({worker_imports:.1f} s; a cold worker imports "
        f"torch, torchvision's ops, timm, Ray Train and raytl there: "
        f"{sum(imports[code].values()):.1f} s in a fresh Python, table below). "
        "torch.distributed, the data and the model take 0.2 s together.",
        *WHY,
    ]
    return lines


def code_for(ref: str, scratch: Path) -> Path:
    """The checkout to measure as "before": a folder holding one, or a git worktree of ``ref``."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    tree = scratch / "before"
    subprocess.run(
        ["git", "worktree", "add", "-q", "--detach", str(tree), ref], cwd=REPO, check=True
    )
    return tree


def measure(runs: list[Run], searches: int, folder: Path) -> tuple[dict, dict, dict]:
    """Each run's trials (``searches`` searches each, the runs alternating), imports, others."""
    results: dict[str, list] = {run.name: [] for run in runs}
    others: dict[str, list[float]] = {run.name: [] for run in runs}
    for rep in range(searches):
        for i, run in enumerate(runs):
            out = folder / f"run{i}-search{rep}"
            others[run.name].append(search_in(run, out))
            results[run.name] += trial_events(out)
    codes = {run.code: run.name for run in runs if not run.env and not run.reuse_actors}
    imports = {name: import_seconds(code, repeats=3) for code, name in codes.items()}
    return results, imports, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a git ref (or a folder with a checkout) to measure too")
    parser.add_argument("--before-label", help="how the table names --before (default: it)")
    parser.add_argument("--variants", action="store_true", help="also the two tried mechanisms")
    parser.add_argument("--searches", type=int, default=1, help="searches of 3 trials per run")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (default 1)")
    parser.add_argument("--keep", type=Path, help="keep each search's raw events in this folder")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    parser.add_argument("--run-search", type=Path, help=argparse.SUPPRESS)  # the child
    parser.add_argument("--reuse-actors", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    SPACE["search"]["max_epochs"] = args.epochs
    if args.run_search:
        run_search(args.run_search, args.reuse_actors)
        return
    with tempfile.TemporaryDirectory(prefix="raytl-startup-") as scratch:
        runs = [Run("this checkout" if not args.before else "after", REPO)]
        if args.before:
            label = f"before ({args.before_label or args.before})"
            runs.insert(0, Run(label, code_for(args.before, Path(scratch))))
        if args.variants:
            runs += [
                Run("+ preload", REPO, env=PRELOAD),
                Run("+ reuse_actors", REPO, reuse_actors=True),
            ]
        try:
            results, imports, others = measure(runs, args.searches, args.keep or Path(scratch))
        finally:
            if args.before and not Path(args.before).is_dir():
                subprocess.run(["git", "worktree", "remove", "--force", runs[0].code], cwd=REPO)
    command = ".venv/bin/python benchmarks/startup.py"
    command += f" --before {args.before}" if args.before else ""
    command += f" --before-label '{args.before_label}'" if args.before_label else ""
    command += " --variants" if args.variants else ""
    command += f" --searches {args.searches}" if args.searches != 1 else ""
    command += f" --epochs {args.epochs}" if args.epochs != 1 else ""
    text = section(command, results, imports, others)
    print(text)
    if not args.no_write:
        write_section(text, HEADING)


if __name__ == "__main__":
    main()
