"""``raytl search``: Ray Tune + OptunaSearch (define-by-run, conditional) + ASHA over Ray Train trials.

Flow: validate the space, load the data once into Ray's object store, run the Tuner, write the
results table, refit the best configuration on train+val, test it once, write ``best/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raytl.config import ParamSpec, SpaceConfig, condition_order
from raytl.data import ImageData
from raytl.data.splits import carve_test
from raytl.errors import RaytlError
from raytl.models import count_blocks, save_model, write_json_atomic
from raytl.report import write_report
from raytl.schemes import assign_units, unit_count
from raytl.tensorboard import callback as tensorboard_callback
from raytl.tensorboard import write_refit_images
from raytl.train import load_dataset, write_skipped, write_space
from raytl.trial import HISTORY_COLUMNS, RESUMED_HISTORY, scheme_units, trial_status

EXPERIMENT = "tune"


def echo_line(line: str) -> None:
    """The default ``echo``: a module function, so Tune can pickle the callbacks that hold it (Ray
    swaps ``builtins.print`` during a run, after which the old ``print`` no longer pickles)."""
    print(line, flush=True)


class DefineByRun:
    """Optuna's define-by-run function for the ``space`` section (a class so Tune can pickle it).

    Parents are sampled before the entries conditional on them, so an inactive entry is simply
    never suggested (Optuna then sees it as absent, which multivariate TPE with ``group=True``
    handles jointly). ``freeze_depth``'s upper bound follows the backbone sampled for the trial.
    """

    def __init__(self, space: dict[str, ParamSpec]) -> None:
        self.ordered = condition_order(space)

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for spec in self.ordered:
            if not spec.is_active(values):
                continue
            if spec.kind == "const":
                values[spec.name] = constants[spec.name] = spec.values[0]
            elif spec.kind == "choice":
                values[spec.name] = trial.suggest_categorical(spec.name, list(spec.values))
            elif spec.kind == "int":
                high = int(spec.high)
                if spec.name == "freeze_depth" and "backbone" in values:
                    high = min(high, count_blocks(values["backbone"]))
                values[spec.name] = trial.suggest_int(spec.name, int(spec.low), high, step=spec.step)
            else:
                values[spec.name] = trial.suggest_float(
                    spec.name, spec.low, spec.high, log=spec.kind == "loguniform"
                )
        return constants or None


def make_searcher(config: SpaceConfig) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    s = config.search
    if s.sampler == "tpe":
        # multivariate TPE models parameters jointly; group=True keeps that working when some
        # parameters exist only for some strategies (otherwise it silently samples independently)
        sampler = optuna.samplers.TPESampler(
            seed=s.seed, multivariate=True, group=True, n_startup_trials=min(4, s.num_samples)
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    return OptunaSearch(
        space=DefineByRun(config.space), metric=s.metric, mode=metric_mode(s.metric), sampler=sampler
    )


def metric_mode(metric: str) -> str:
    return "min" if metric.endswith("loss") else "max"


def make_scheduler(config: SpaceConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = config.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=s.max_epochs,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def check_resources(config: SpaceConfig) -> None:
    """Fail before starting if a trial can never be placed or units cannot be shared out."""
    import ray

    r = config.resources
    assign_units(unit_count(config.scheme), r.workers_per_trial)  # raises if W does not fit U
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= r.cpus_per_worker
            and n["Resources"].get("GPU", 0) >= r.gpus_per_worker]
    if not fits:
        biggest = max((n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes)
        raise RaytlError(
            f"{config.source}: resources: a worker asks for {r.cpus_per_worker} CPU and "
            f"{r.gpus_per_worker} GPU, but the largest node has {biggest[0]:g} CPU and {biggest[1]:g} GPU"
        )
    slots = sum(_worker_slots(n["Resources"], r.cpus_per_worker, r.gpus_per_worker) for n in fits)
    if slots < r.workers_per_trial:
        raise RaytlError(
            f"{config.source}: resources: a trial needs {r.workers_per_trial} workers of "
            f"{r.cpus_per_worker} CPU and {r.gpus_per_worker} GPU, but the whole cluster fits only "
            f"{slots} at once"
        )


def _worker_slots(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of this size one node holds (trials queue for free slots, never fail)."""
    count = int(resources.get("CPU", 0) // cpus)
    if gpus > 0:
        count = min(count, int(resources.get("GPU", 0) // gpus))
    return count


def progress_callback(total: int, metric: str, echo: Callable[[str], None],
                      clock_path: Path | None = None) -> Any:
    """A Tune callback printing one line per trial result: the live view of the search.

    It also keeps the driver's clock per trial (launched, finished) in ``clock_path``, a JSON file
    that survives the driver (``raytl resume`` reads it back).
    """
    from ray.tune import Callback

    class ProgressLine(Callback):
        def __init__(self) -> None:
            self.best: float | None = None
            self.finished = 0
            self.started = time.perf_counter()
            # the driver's wall clock per trial: launched (Tune starts it), finished
            self.clock: dict[str, dict[str, float]] = read_clock(clock_path)
            self.finished = sum(1 for t in self.clock.values() if "finished_at" in t)

        def _tick(self, trial_id: str, event: str) -> None:
            self.clock = {**read_clock(clock_path), **self.clock}  # a restored copy starts stale
            times = self.clock.setdefault(trial_id, {})
            if event != "launched_at" or event not in times:  # a retried trial keeps its 1st launch
                times[event] = time.time()
            if clock_path is not None:
                tmp = clock_path.with_name(f".{clock_path.name}.tmp")
                tmp.write_text(json.dumps(self.clock))
                tmp.replace(clock_path)

        def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
            self._tick(trial.trial_id, "launched_at")

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
            value = result.get(metric)
            if value is None:
                return
            if self.best is None or (value > self.best if metric_mode(metric) == "max"
                                     else value < self.best):
                self.best = value
            config = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
            echo(f"[{time.perf_counter() - self.started:6.0f}s] {trial.trial_id} epoch "
                 f"{result.get('epoch')}/{result.get('total_epochs')} {metric} {value:.4f} "
                 f"(±{result.get(metric + '_std', 0):.4f}) | {self.finished}/{total} done, "
                 f"best {self.best:.4f} | {config}")

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
            self.finished += 1
            self._tick(trial.trial_id, "finished_at")

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
            self.finished += 1
            self._tick(trial.trial_id, "finished_at")
            echo(f"trial {trial.trial_id} failed: see {trial.path}")

    return ProgressLine()


CLOCK_FILE = ".trial_clock.json"


def read_clock(path: Path | None) -> dict[str, dict[str, float]]:
    if path is None or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def cluster_wants_token(address: str, wait_s: float = 10.0) -> bool | None:
    """Whether the cluster's GCS at ``address`` checks auth tokens, asked without one.

    A token-mode GCS refuses an unauthenticated call at once. The answer decides the driver's
    mode: a driver in token mode joining a cluster without it is unreachable to that cluster's
    raylets (they cannot call back into it, and its trials die before they start), and one
    without a token cannot join a token cluster. None when there is nothing to ask
    (``auto``, ``ray://``) or no answer within ``wait_s`` (ray.init then reports the address).
    """
    import threading

    if address == "auto" or "://" in address:
        return None
    answer: list[bool] = []

    def ask() -> None:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError

        try:
            GcsClient(address=address).internal_kv_keys(b"raytl", namespace=None, timeout=5)
            answer.append(False)
        except AuthenticationError:
            answer.append(True)
        except Exception:  # unreachable or not a GCS: ray.init says so in its own words
            pass

    thread = threading.Thread(target=ask, daemon=True)  # a dead address blocks for ~40 s
    thread.start()
    thread.join(wait_s)
    return answer[0] if answer else None


def init_ray(address: str | None) -> bool:
    """Connect to a cluster (``--address``), or start a local Ray bound to 127.0.0.1.

    Returns whether this call started Ray (and so should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if address:
        from raytl.jobs import find_token

        token = find_token()
        wants = cluster_wants_token(address) if "RAY_AUTH_MODE" not in os.environ else None
        if wants is None:  # not asked (mode set by the user, "auto", ray://) or no answer
            wants = token is not None and "RAY_AUTH_MODE" not in os.environ
        if wants:
            if token is None:
                raise RaytlError(f"the Ray cluster at {address} uses token authentication and no "
                                 "token was found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or "
                                 "put it in ~/.ray/auth_token)")
            # Ray only sends a token when told to (never turns authentication off)
            os.environ["RAY_AUTH_MODE"] = "token"
            from ray._raylet import Config  # Ray reads the mode once; make it read it again

            Config.initialize("")
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            hint = ("" if token else "; if the cluster uses token authentication, set "
                    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or put it in ~/.ray/auth_token)")
            raise RaytlError(f"cannot reach the Ray cluster at {address}: {exc}{hint}") from None
        return True
    # The dashboard (bound to 127.0.0.1, never 0.0.0.0) serves the State API, which Ray Train V2's
    # placement-group cleaner needs: without it, a trial that ASHA stops leaks its workers'
    # placement group and the next trial waits for CPUs forever (ray-project/ray#54305).
    # address="local": always a new Ray of our own. With None, ray.init joins whatever cluster
    # /tmp/ray/ray_current_cluster names (another search's, or a dead one it then waits for).
    context = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=_free_port(), **kwargs)
    # Ray's State API (Train V2's placement-group cleaner calls it inside the cluster) finds the
    # cluster through /tmp/ray/ray_current_cluster, which only `ray start` and
    # ray.cluster_utils write. Left pointing at a cluster that is gone, every stopped trial's
    # placement group leaks and the search deadlocks; point it at this one, as `ray start` would.
    ray._private.utils.write_ray_address(context.address_info["gcs_address"])
    return True


SEARCH_OUTPUTS = ("ray", "tensorboard", "best", "results.parquet", "results.csv", "history.parquet",
                  "report.md", "space.yaml", "skipped.txt", "metric_per_trial.png",
                  "metric_by_strategy.png", "metric_vs_freeze_depth.png", "learning_curves.png",
                  "confusion_matrix.png", ".trial_clock.json", ".data_fingerprint")


def clear_search_outputs(output: Path) -> None:
    """Remove what an earlier search wrote to ``output`` (``--overwrite``), and nothing else.

    Without this, the new search's TensorBoard runs and Tune experiment would mix with the old.
    """
    import shutil

    for name in SEARCH_OUTPUTS:
        path = Path(output) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def publish_to_storage(output: Path, storage: str) -> None:
    """Copy the reviewable outputs next to the experiment on ``search.storage`` (a shared folder or a
    pyarrow URI such as s3://), so whoever reads the storage has the results and TensorBoard runs."""
    import shutil

    import pyarrow.fs as pafs

    target = storage.rstrip("/")
    fs, base = pafs.FileSystem.from_uri(target) if "://" in target else (pafs.LocalFileSystem(), target)
    fs.create_dir(base, recursive=True)
    for name in ("tensorboard", "best", "results.parquet", "results.csv", "history.parquet",
                 "report.md", "space.yaml"):
        source = output / name
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in (p for p in files if p.exists()):
            relative = path.relative_to(output).as_posix()
            fs.create_dir(f"{base}/{relative}".rsplit("/", 1)[0], recursive=True)
            with path.open("rb") as src, fs.open_output_stream(f"{base}/{relative}") as dst:
                shutil.copyfileobj(src, dst)


def _free_port() -> int:
    """A free port on 127.0.0.1, so a second local search does not collide on the dashboard's."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_search(
    config: SpaceConfig, output: Path, *, address: str | None = None,
    echo: Callable[[str], None] = echo_line, data: ImageData | None = None,
    data_ref: list[Any] | None = None, refit: bool = True,
    feature_refs: dict[str, Any] | None = None, resume: bool = False,
) -> pd.DataFrame:
    """Run the whole search into ``output`` and return the results table.

    ``resume=True`` continues the search whose Tune experiment is on the storage (the driver was
    killed, the machine rebooted): finished trials are kept, unfinished ones resume from their last
    checkpoints, the searcher's state (the Optuna study) is restored with it, and only the missing
    trials are sampled, so the search still ends with exactly ``num_samples`` trials.

    ``data``/``data_ref`` let a caller that runs several searches on one dataset (``raytl compare``)
    load it and put it in the object store once; ``refit=False`` skips the refit of the best trial.
    """
    import ray
    from ray import tune

    started = time.perf_counter()
    output = Path(output).resolve()
    if not resume:
        write_space(output, config)
    if data is None:
        data = load_dataset(config)
    check_same_data(output, data, resume)
    write_skipped(output, data)
    scheme_units(config, data)  # folds/segments must fit every class: one line now, not per trial
    echo(f"data: {data.source}: {len(data)} images, {len(data.class_names)} classes, "
         f"fingerprint {data.fingerprint}; scheme {config.scheme.kind} "
         f"({unit_count(config.scheme)} unit(s)); {config.search.num_samples} trials, "
         f"{config.resources.workers_per_trial} worker(s) each")
    owns_ray = init_ray(address)
    try:
        check_resources(config)
        storage = config.search.storage or str(output / "ray")
        if "://" not in storage:
            storage = str(Path(storage).resolve())  # Tune and Train want absolute local paths
        if data_ref is None:
            data_ref = [ray.put(data)]  # once per search; workers read it from the object store
        if feature_refs is None:
            feature_refs = prepare_feature_cache(config, data_ref, storage, echo)
        trainable = tune.with_parameters(
            _trial_entry, space=config.to_dict(), source=config.source, data_ref=data_ref,
            storage_path=storage, max_failures=config.search.max_failures,
            feature_refs=feature_refs,
        )
        # The Tune trial reserves no CPU: it only drives its TorchTrainer, whose workers ask for
        # their own CPUs/GPUs, or (a lean trial) trains a linear head on cached features, which is
        # light. A CPU held by Tune here would be one Ray Train cannot get: Tune stages placement
        # groups for upcoming trials, and a 2-worker trial on 2 cores would wait forever. A zero
        # request must carry some resource (Ray refuses an empty one), hence one byte of memory.
        trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 1})
        s = config.search
        experiment = f"{storage.rstrip('/')}/{EXPERIMENT}"
        if resume:
            if not tune.Tuner.can_restore(experiment):
                raise RaytlError(f"{output}: no interrupted search to resume (no Tune experiment "
                                 f"at {experiment})")
            echo(f"resuming the search in {experiment}")
            # the run config (callbacks included) and the searcher's state come from the experiment
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=make_searcher(config), scheduler=make_scheduler(config),
                    metric=s.metric, mode=metric_mode(s.metric), num_samples=s.num_samples,
                    max_concurrent_trials=s.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT, storage_path=storage, verbose=0,
                    callbacks=[progress_callback(s.num_samples, s.metric, echo,
                                                 output / CLOCK_FILE),
                               tensorboard_callback(output / "tensorboard", config.space, config.name)],
                    failure_config=tune.FailureConfig(max_failures=s.max_failures),
                ),
            )
        grid = tuner.fit()
        table = results_table(grid, config, clock=read_clock(output / CLOCK_FILE))
        write_results(output, table, history_table(grid))
        if len(table) and (table["status"] == "error").all():
            first = table["error"].dropna()
            raise RaytlError(
                f"every trial failed ({len(table)} of {len(table)}); the first error: "
                f"{first.iloc[0] if len(first) else 'unknown'} (results.parquet in {output}; each "
                f"trial's error.txt under {storage})")
        echo("")
        echo(format_top(table, config.search.metric))
        best = best_row(table, config.search.metric)
        if best is not None and refit:
            refit_best(config, data, best, output, data_ref=data_ref, echo=echo,
                       feature_refs=feature_refs)
        report = write_report(output)
        if config.search.storage:
            publish_to_storage(output, config.search.storage)
        echo(f"search finished in {time.perf_counter() - started:.0f}s; results in {output}, "
             f"report in {report}")
        echo(f"review the trials: tensorboard --logdir {output / 'tensorboard'} --host 127.0.0.1")
        return table
    finally:
        if owns_ray:
            ray.shutdown()


def check_same_data(output: Path, data: ImageData, resume: bool) -> None:
    """Record the data's fingerprint; a resumed search must see exactly the same data."""
    path = output / ".data_fingerprint"
    if resume and path.is_file() and path.read_text().strip() != data.fingerprint:
        raise RaytlError(f"{output}: the data changed since the search started (fingerprint "
                         f"{path.read_text().strip()}, now {data.fingerprint}); resuming would mix "
                         "trials scored on different data")
    if not resume or not path.is_file():
        path.write_text(data.fingerprint + "\n")


def cacheable_backbones(config: SpaceConfig) -> list[str]:
    """The backbones whose frozen features some trial of this space can train on: there is a
    linear probe or lp_ft among the strategies, pretrained weights, and the cache is on."""
    if not config.cache or config.model.pretrained == "none":
        return []

    def options(name: str, default: Any) -> list[Any]:
        spec = config.space.get(name)
        return list(spec.values) if spec is not None and spec.kind in ("const", "choice") else [default]

    if not {"linear_probe", "lp_ft"} & set(options("strategy", "fine_tune")):
        return []
    if options("augment", False) == [True]:
        return []
    return [b or config.model.backbone for b in options("backbone", None)]


def prepare_feature_cache(config: SpaceConfig, data_ref: list[Any], storage: str,
                          echo: Callable[[str], None]) -> dict[str, Any]:
    """Compute (or read) the frozen features once per backbone, before any trial starts (the
    single producer), on a worker-sized Ray task; trials get them through the object store."""
    import ray

    backbones = cacheable_backbones(config)
    if not backbones:
        return {}
    r = config.resources
    task = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                      num_returns=2)(_features_task)
    root = f"{storage.rstrip('/')}/feature_cache"
    refs = {}
    for backbone in backbones:
        features_ref, info_ref = task.remote(root, backbone, config.model.pretrained, data_ref,
                                             config.data.image_size, r.cpus_per_worker)
        info = ray.get(info_ref)
        echo(f"feature cache: {backbone} {'computed' if info['computed'] else 'read'} "
             f"{info['shape'][0]}x{info['shape'][1]} in {info['seconds']:.1f}s ({info['path']})")
        refs[backbone] = features_ref
    return refs


def _features_task(root: str, backbone: str, pretrained: str, data_ref: list[Any],
                   image_size: int, cpus: float) -> tuple[Any, dict[str, Any]]:
    import ray
    import torch

    from raytl.feature_cache import ensure_features, entry_path

    torch.set_num_threads(max(1, int(cpus)))
    result = ensure_features(root, backbone, pretrained, ray.get(data_ref[0]), image_size)
    return result.features, {"computed": result.computed, "seconds": result.seconds,
                             "shape": result.features.shape, "path": entry_path(root, result.key)}


def _trial_entry(sampled: dict[str, Any], **kwargs: Any) -> None:
    from raytl.trial import run_trial

    run_trial(sampled, **kwargs)


SAMPLED_COLUMNS = ("strategy", "backbone", "freeze_depth", "head_lr", "backbone_lr", "layer_decay",
                   "weight_decay", "label_smoothing", "batch_size", "epochs", "lp_epochs", "augment")


def results_table(grid: Any, config: SpaceConfig,
                  clock: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """One row per trial: sampled values (missing where inactive), status, metrics, costs.

    ``clock`` (the progress callback's) adds when the driver launched each trial and saw it end,
    so ``overhead_seconds`` (launch to the first training step) and ``trial_seconds`` are real.
    """
    metric = config.search.metric
    rows = []
    for result in grid:
        m = result.metrics or {}
        cfg = result.config or {}
        epochs = int(m.get("epoch") or 0)
        status = trial_status(m, failed=result.error is not None)
        row: dict[str, Any] = {"trial_id": m.get("trial_id") or Path(result.path).name, "status": status}
        sampled = {k: cfg.get(k) for k in SAMPLED_COLUMNS if k in cfg}
        hp = config.hyperparameters({k: v for k, v in sampled.items() if v is not None})
        for key in SAMPLED_COLUMNS:
            row[key] = cfg.get(key, None)
        row["strategy"] = hp.strategy
        row["backbone"] = hp.backbone
        row["scheme"] = config.scheme.kind
        row["units"] = m.get("units")
        row[f"{metric}_mean"] = m.get(metric, math.nan)
        row[f"{metric}_std"] = m.get(f"{metric}_std", math.nan)
        for other in ("val_accuracy", "val_loss"):
            if other != metric:
                row[f"{other}_mean"] = m.get(other, math.nan)
                row[f"{other}_std"] = m.get(f"{other}_std", math.nan)
        unit_names = sorted({k.split("/")[1] for k in m if k.startswith("unit/")})
        row["unit_names"] = unit_names
        row["unit_val_accuracy"] = [m.get(f"unit/{u}/val_accuracy") for u in unit_names]
        row["unit_nodes"] = [m.get(f"unit/{u}/node_id") for u in unit_names]
        row["epochs"] = epochs
        row["wall_seconds"] = m.get("time_total_s", math.nan)
        row["worker_seconds"] = m.get("worker_seconds", math.nan)
        row["startup_seconds"] = m.get("startup_seconds", math.nan)
        row["restarts"] = m.get("restarts", 0)
        row["restart_startup_seconds"] = m.get("restart_startup_seconds", math.nan)
        row["nodes"] = m.get("nodes")
        row["head_only"] = m.get("head_only")
        times = (clock or {}).get(str(row["trial_id"]), {})
        row["launched_at"] = times.get("launched_at", math.nan)
        row["overhead_seconds"] = m.get("ready_at", math.nan) - row["launched_at"]
        row["trial_seconds"] = times.get("finished_at", math.nan) - row["launched_at"]
        frame = result.metrics_dataframe
        has_time = frame is not None and len(frame) and "timestamp" in frame
        row["started_at"] = float(frame["timestamp"].min()) if has_time else math.nan  # 1st report
        row["error"] = str(result.error).splitlines()[0][:300] if result.error else None
        row["path"] = result.path
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values("trial_id").reset_index(drop=True)
    return table


def history_table(grid: Any) -> pd.DataFrame:
    """One row per trial and epoch (mean over units), for learning curves.

    After a restore Tune repeats the epochs since the last checkpoint (ray#4187): the last row of
    each (trial_id, epoch) wins. It also forgets the results it had not saved before the driver
    died; a resumed trial's first report brings those epochs back (``resumed_history``).
    """
    frames = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or not len(frame) or "epoch" not in frame:
            continue
        recovered = [pd.DataFrame(json.loads(v)) for v in frame.get(RESUMED_HISTORY, [])
                     if isinstance(v, str) and v]
        frame = pd.concat([*recovered, frame], ignore_index=True)
        frame = frame[[c for c in frame.columns if c in HISTORY_COLUMNS]].copy()
        frame["trial_id"] = (result.metrics or {}).get("trial_id") or Path(result.path).name
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["trial_id", *HISTORY_COLUMNS])
    history = pd.concat(frames, ignore_index=True).dropna(subset=["epoch"])
    history["epoch"] = history["epoch"].astype(int)
    history = history.drop_duplicates(["trial_id", "epoch"], keep="last")
    return history.sort_values(["trial_id", "epoch"]).reset_index(drop=True)


def write_results(output: Path, table: pd.DataFrame, history: pd.DataFrame | None = None) -> None:
    """results.parquet, results.csv (and history.parquet), each written to a temporary file, renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = output / ".results.parquet.tmp"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)
    tmp.replace(output / "results.parquet")
    if history is not None:
        tmp = output / ".history.parquet.tmp"
        pq.write_table(pa.Table.from_pandas(history, preserve_index=False), tmp)
        tmp.replace(output / "history.parquet")
    tmp = output / ".results.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(output / "results.csv")


def best_row(table: pd.DataFrame, metric: str) -> pd.Series | None:
    column = f"{metric}_mean"
    ok = table[table["status"] != "error"].dropna(subset=[column]) if len(table) else table
    if not len(ok):
        return None
    ok = ok.sort_values([column, "epochs"], ascending=[metric_mode(metric) == "min", False])
    return ok.iloc[0]


def format_top(table: pd.DataFrame, metric: str, n: int = 10) -> str:
    if not len(table):
        return "no trials ran"
    column = f"{metric}_mean"
    shown = table.sort_values(column, ascending=metric_mode(metric) == "min", na_position="last")
    columns = ["trial_id", "status", "strategy", "freeze_depth", "head_lr", "backbone_lr", column,
               f"{metric}_std", "epochs", "worker_seconds"]
    shown = shown[[c for c in columns if c in shown]].head(n)
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        return f"top trials by {metric} ({len(table)} in all):\n{shown.to_string(index=False)}"


def refit_best(config: SpaceConfig, data: ImageData, best: pd.Series, output: Path, *,
               data_ref: list[Any], echo: Callable[[str], None] = echo_line,
               feature_refs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrain the best configuration on train+val (one unit), test once, write ``best/``."""
    import ray

    sampled = sampled_values(best)
    hp = config.hyperparameters(sampled)
    echo(f"refitting the best trial {best['trial_id']} on train+val: "
         + ", ".join(f"{k}={_fmt(v)}" for k, v in dataclasses.asdict(hp).items()))
    r = config.resources
    remote = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(_refit)
    result = ray.get(remote.remote(config.to_dict(), config.source, sampled, data_ref, True,
                                   feature_refs))
    from raytl.models import create_model

    model = create_model(hp.backbone, len(data.class_names), "none")
    model.load_state_dict(result.pop("state"))
    best_dir = output / "best"
    summary = {"trial_id": best["trial_id"], "hyperparameters": dataclasses.asdict(hp),
               "search_metric": config.search.metric,
               "search_value": float(best[f"{config.search.metric}_mean"]), **result}
    save_model(best_dir, model, backbone=hp.backbone, class_names=list(data.class_names),
               preprocessing=result.pop("preprocessing"),
               extra={"hyperparameters": dataclasses.asdict(hp)})
    summary.pop("preprocessing", None)
    write_json_atomic(best_dir / "metrics.json", summary)
    _, test = carve_test(data.labels, config.data.test_fraction, config.data.seed, data.class_names)
    write_refit_images(output / "tensorboard", list(data.class_names), result["test_labels"],
                       result["test_predictions"], data.images[test])
    echo(f"best configuration: test accuracy {result['test_accuracy']:.4f} on "
         f"{result['test_images']} untouched images (refit {result['seconds']:.0f}s); saved to {best_dir}")
    return summary


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def sampled_values(row: pd.Series) -> dict[str, Any]:
    """A results row's sampled hyperparameters as plain Python values (inactive ones left out)."""
    sampled = {k: row[k] for k in SAMPLED_COLUMNS if k in row and not _missing(row[k])}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in sampled.items()}


def _refit(space: dict[str, Any], source: str, sampled: dict[str, Any],
           data_ref: list[Any], keep_state: bool = True,
           feature_refs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Ray task: train the configuration on the whole pool, evaluate on the test split.

    ``keep_state=False`` returns the figures only (``raytl compare`` refits many configurations).
    """
    import ray
    import torch

    from raytl.config import parse_space
    from raytl.worker import UnitTrainer

    started = time.perf_counter()
    data = ray.get(data_ref[0])  # the search's copy in the object store, not a second one
    config = parse_space(space, source, local_paths=False)  # validated by the driver
    hp = config.hyperparameters(sampled)
    pool, test = carve_test(data.labels, config.data.test_fraction, config.data.seed, data.class_names)
    ref = (feature_refs or {}).get(hp.backbone)
    trainer = UnitTrainer(hp, data, pool, np.array([], dtype=np.int64),
                          pretrained=config.model.pretrained, image_size=config.data.image_size,
                          seed=config.search.seed, features=ray.get(ref) if ref is not None else None,
                          compile=config.model.compile)
    history = [trainer.run_epoch() for _ in range(trainer.total_epochs)]
    result = trainer.evaluate(test)
    state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()} if keep_state else None
    return {
        "state": state, "preprocessing": trainer.pre, "test_accuracy": result.accuracy,
        "test_loss": result.loss, "test_images": len(test), "train_images": len(pool),
        "train_loss": [h["train_loss"] for h in history], "seconds": time.perf_counter() - started,
        "device": str(trainer.device), "torch_threads": torch.get_num_threads(),
        "test_predictions": result.predictions.tolist(), "test_labels": data.labels[test].tolist(),
    }

