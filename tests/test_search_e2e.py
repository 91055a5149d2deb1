"""End to end: a real search on a local Ray (Tune + Optuna + ASHA over 2-worker Ray Train trials)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raytl.search import run_search
from raytl.space_file import parse_space
from tests.conftest import remove_ray_temp_of, shared_ray_temp_restored

SPACE = {
    "name": "e2e",
    "data": {"source": "digits", "image_size": 48, "limit": 600, "test_fraction": 0.2},
    "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
    "scheme": {"kind": "cv", "folds": 2},
    "search": {
        "num_samples": 4,
        "max_concurrent": 1,
        "max_epochs": 2,
        "grace_period": 1,
        "reduction_factor": 2,
        "seed": 3,
    },
    "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
    "space": {
        "strategy": {"choice": ["linear_probe", "fine_tune"]},
        "freeze_depth": {"int": [3, 7], "when": {"strategy": ["fine_tune"]}},
        "head_lr": {"loguniform": [1.0e-2, 5.0e-2]},
        "backbone_lr": {"loguniform": [3.0e-4, 3.0e-3], "when": {"strategy": ["fine_tune"]}},
        "batch_size": 16,
    },
}


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """One real search, shared by the tests below (it is the expensive part)."""
    out = tmp_path_factory.mktemp("search")
    storage = tmp_path_factory.mktemp("storage") / "experiment"  # a "shared" storage folder
    space = {**SPACE, "search": {**SPACE["search"], "storage": str(storage)}}
    # a stale pointer to a cluster that is gone (left by an earlier `ray start`): raytl must start
    # and use its own Ray regardless, or ASHA-stopped trials leak their workers' placement groups
    with current_cluster_file_as("127.0.0.1:9") as pointer:
        table = run_search(parse_space(space, "e2e.yaml"), out, echo=lambda line: None)
        after = pointer.read_text() if pointer.is_file() else None
    return out, table, after


@contextlib.contextmanager
def current_cluster_file_as(content: str | None):
    """Ray's current-cluster file set to ``content`` (None: absent) for the block; the machine's
    own file is put back afterwards."""
    import ray._private.utils

    pointer = Path(ray._private.utils.get_ray_address_file(None))
    saved = pointer.read_text() if pointer.is_file() else None
    folder_was_there = pointer.parent.is_dir()
    try:
        pointer.unlink(missing_ok=True)
        if content is not None:
            pointer.parent.mkdir(parents=True, exist_ok=True)
            pointer.write_text(content)
        yield pointer
    finally:
        pointer.unlink(missing_ok=True)
        if saved is not None:
            pointer.write_text(saved)
        elif not folder_was_there:  # Ray's temp folder, made for the file: gone again if empty
            with contextlib.suppress(OSError):
                pointer.parent.rmdir()


@pytest.mark.slow
def test_search_end_to_end(search, tmp_path):
    out, table, _ = search

    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 4 == len(table)
    assert (out / "results.csv").is_file() and (out / "space.yaml").is_file()
    assert set(results["status"]) <= {"completed", "stopped"}
    assert set(results["strategy"]) == {"linear_probe", "fine_tune"}  # both explored
    assert ((results["epochs"] >= 1) & (results["epochs"] <= 2)).all()  # ASHA or max_epochs
    assert (results["status"] == "completed").sum() >= 1
    probes = results[results["strategy"] == "linear_probe"]
    tunes = results[results["strategy"] == "fine_tune"]
    assert probes["freeze_depth"].isna().all() and probes["backbone_lr"].isna().all()
    assert tunes["freeze_depth"].between(3, 7).all() and tunes["backbone_lr"].notna().all()
    for _, row in results.iterrows():
        assert list(row["unit_names"]) == ["fold_0", "fold_1"]
        accs = np.array(row["unit_val_accuracy"], dtype=float)
        assert np.isclose(accs.mean(), row["val_accuracy_mean"])
        assert np.isclose(accs.std(), row["val_accuracy_std"])
        assert row["worker_seconds"] > 0 and row["wall_seconds"] > 0
    assert results["val_accuracy_mean"].max() > 0.4  # 10 classes: chance is 0.1
    # every metric a search can select by, per trial and per unit (10 classes: top-5 too)
    for name in ("val_balanced_accuracy", "val_macro_f1", "val_top5_accuracy"):
        assert results[f"{name}_mean"].between(0, 1).all() and results[f"{name}_std"].notna().all()
        for _, row in results.iterrows():
            units = np.array(row[f"unit_{name}"], dtype=float)
            assert len(units) == 2 and np.isclose(units.mean(), row[f"{name}_mean"])
    assert (results["val_top5_accuracy_mean"] >= results["val_accuracy_mean"]).all()
    # every trial's model size and latency; the first trials were the seeded recipes, in order
    assert (results["params"] > 3e6).all() and (results["latency_ms_batch1"] > 0).all()
    from raytl.rundir import read_trial_clock

    seeds = parse_space(SPACE, "e2e.yaml").seed_points()
    clock = read_trial_clock(out)
    started = results.set_index("trial_id").loc[
        sorted(clock, key=lambda t: clock[t]["launched_at"])
    ]
    assert len(seeds) == 3  # no lp_ft in this space
    for (_, row), seed in zip(started.iterrows(), seeds, strict=False):
        assert {k: row[k] for k in seed} == pytest.approx(seed), (row.to_dict(), seed)
    storage = Path(results["path"].iloc[0]).parents[1]
    # the Ray experiment lives on search.storage, for resuming, in a folder of this run's own
    run_id = json.loads((out / ".raytl-run.json").read_text())["run_id"]
    assert storage.name == f"e2e-{run_id}" and (storage / "tune").is_dir()
    assert list(storage.glob("train_*/checkpoint_epoch_*/unit_0.pt"))  # every epoch, every unit
    assert list(storage.glob("train_*/checkpoint_epoch_*/unit_1.pt"))
    assert (storage / "tensorboard").is_dir() and (storage / "results.parquet").is_file()
    # the frozen features were computed once for the search, and the probes trained on them alone
    # (beside the runs' folders: an entry is keyed by content, so every run on the storage shares it)
    assert len(list(storage.parent.glob("feature_cache/*/features.parquet"))) == 1
    assert probes["head_only"].all() and not tunes["head_only"].any()
    assert (probes["overhead_seconds"] < tunes["overhead_seconds"].min()).all()  # no worker group
    assert (results["trial_seconds"] > 0).all() and (results["overhead_seconds"] > 0).all()

    best = out / "best"
    for name in ("model.safetensors", "config.json", "class_names.json", "metrics.json"):
        assert (best / name).is_file()
    metrics = pd.read_json(best / "metrics.json", typ="series")
    assert metrics["test_accuracy"] > 0.4
    assert 0 < metrics["test_macro_f1"] <= 1 and 0 < metrics["test_balanced_accuracy"] <= 1
    assert metrics["test_top5_accuracy"] >= metrics["test_accuracy"]

    from raytl.data import load_data

    digits = load_data("digits")
    image = tmp_path / "seven.png"
    index = int(np.flatnonzero(digits.labels == 7)[0])
    Image.fromarray(digits.images[index]).resize((48, 48)).save(image)
    proc = subprocess.run(
        [sys.executable, "-m", "raytl", "predict", str(best), str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(str(image)) and line.count(" 0.") + line.count(" 1.0") == 3


def _plugin_data(accumulator):
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = {}
    for tag, content in accumulator.PluginTagToContent("hparams").items():
        out[tag] = plugin_data_pb2.HParamsPluginData.FromString(content)
    return out


@pytest.mark.slow
def test_tensorboard_scalars_and_hparams_read_back(search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = search
    results = pd.read_parquet(out / "results.parquet")
    logdir = out / "tensorboard"
    root = EventAccumulator(str(logdir))
    root.Reload()
    experiment = _plugin_data(root)["_hparams_/experiment"].experiment
    infos = {info.name: info for info in experiment.hparam_infos}
    # the choices, in TensorBoard's own order (hparams.summary_v2.Discrete sorts its values)
    assert [v.string_value for v in infos["strategy"].domain_discrete.values] == [
        "fine_tune",
        "linear_probe",
    ]
    assert [v.number_value for v in infos["freeze_depth"].domain_discrete.values] == [3, 4, 5, 6, 7]
    assert infos["head_lr"].domain_interval.min_value == pytest.approx(1e-2)
    assert infos["head_lr"].domain_interval.max_value == pytest.approx(5e-2)
    assert {m.name.tag for m in experiment.metric_infos} >= {
        "final/val_accuracy",
        "final/status",
        "best/val_accuracy",
        "best/epoch",
        "final/val_macro_f1",
        "best/val_balanced_accuracy",
        "final/val_top5_accuracy",
    }

    for _, row in results.iterrows():
        run = logdir / f"trial_{row['trial_id']}"
        acc = EventAccumulator(str(run))
        acc.Reload()
        values = [e.value for e in acc.Scalars("val_accuracy")]
        assert [e.step for e in acc.Scalars("val_accuracy")] == list(range(1, row["epochs"] + 1))
        assert values[-1] == pytest.approx(row["val_accuracy_mean"], abs=1e-6)
        assert acc.Scalars("final/epochs")[-1].value == row["epochs"]
        curve = [e.value for e in acc.Scalars("val_accuracy")]  # the search's metric, per epoch
        best_epoch = int(np.argmax(curve)) + 1
        assert acc.Scalars("best/epoch")[-1].value == best_epoch
        assert acc.Scalars("best/val_accuracy")[-1].value == pytest.approx(max(curve), abs=1e-6)
        val_loss = [e.value for e in acc.Scalars("val_loss")]
        assert acc.Scalars("best/val_loss")[-1].value == pytest.approx(val_loss[best_epoch - 1])
        assert (
            acc.Scalars("final/status")[-1].value == {"completed": 2, "stopped": 1}[row["status"]]
        )
        data = _plugin_data(acc)
        start = data["_hparams_/session_start_info"].session_start_info
        assert start.hparams["strategy"].string_value == row["strategy"]
        if row["strategy"] == "linear_probe":
            assert "freeze_depth" not in start.hparams  # inactive: absent, not a default
        else:
            assert start.hparams["freeze_depth"].number_value == row["freeze_depth"]
            assert start.hparams["backbone_lr"].number_value == pytest.approx(row["backbone_lr"])
        assert data["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
        for unit in ("fold_0", "fold_1"):
            unit_acc = EventAccumulator(str(run / unit))
            unit_acc.Reload()
            tags = unit_acc.Tags()["scalars"]
            assert {"train_loss", "val_accuracy", "val_loss", "lr/head"} <= set(tags)
            assert {"val_balanced_accuracy", "val_macro_f1", "val_top5_accuracy"} <= set(tags)
            assert len(unit_acc.Scalars("val_loss")) == row["epochs"]

    best = EventAccumulator(str(logdir / "best"))
    best.Reload()
    assert "test/confusion_matrix" in best.Tags()["images"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_server_serves_the_hparams_plugin(search):
    out, _, _ = search
    results = pd.read_parquet(out / "results.parquet")
    port = _free_port()
    tensorboard = Path(sys.executable).parent / "tensorboard"
    server = subprocess.Popen(
        [
            str(tensorboard),
            "--logdir",
            str(out / "tensorboard"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/data/plugin/hparams"
    try:
        deadline = time.time() + 60
        while True:
            try:
                experiment = _post(f"{base}/experiment", {"experimentName": ""})
                if experiment.get("hparamInfos"):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "tensorboard did not serve the hparams plugin"
            time.sleep(1)
        names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"strategy", "freeze_depth", "head_lr", "backbone_lr"} <= names
        groups = _post(
            f"{base}/session_groups",
            {
                "experimentName": "",
                "allowedStatuses": [
                    "STATUS_UNKNOWN",
                    "STATUS_SUCCESS",
                    "STATUS_FAILURE",
                    "STATUS_RUNNING",
                ],
                "colParams": [{"hparam": "strategy"}, {"metric": {"tag": "final/val_accuracy"}}],
                "startIndex": 0,
                "sliceSize": 100,
            },
        )
        assert int(groups["totalSize"]) == len(results)
        served = {g["hparams"]["strategy"] for g in groups["sessionGroups"]}
        assert served == set(results["strategy"])
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_report_has_sections_and_valid_plots(search):
    out, _, _ = search
    report = (out / "report.md").read_text()
    for heading in (
        "## Best configuration",
        "### Per class on the test split",
        "## Trials",
        "## Plots",
        "tensorboard --logdir",
    ):
        assert heading in report
    for name in (
        "metric_per_trial.png",
        "metric_by_strategy.png",
        "metric_vs_freeze_depth.png",
        "learning_curves.png",
        "metric_vs_latency.png",
        "confusion_matrix.png",
    ):
        assert f"({name})" in report
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
    history = pd.read_parquet(out / "history.parquet")
    assert not history.duplicated(["trial_id", "epoch"]).any()
    proc = subprocess.run(
        [sys.executable, "-m", "raytl", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "tensorboard --logdir" in proc.stdout


@pytest.mark.slow
def test_the_current_cluster_file_is_given_back_as_found(search):
    """raytl points Ray's current-cluster file at its own Ray while the search runs, and puts back
    what was there when that Ray stops (here the stale pointer the fixture left)."""
    _, _, after = search
    assert after == "127.0.0.1:9"


@pytest.mark.slow
def test_plain_ray_init_in_another_program_works_after_a_search(tmp_path, space_file):
    """No file before the search, none after: another program's ``ray.init()`` starts its own
    Ray instead of waiting on the search's dead one. And the search's console holds raytl's lines
    only: no Ray warning, no Tune table (they are in the log it names)."""
    space = space_file(
        {
            "data": {"source": "digits", "image_size": 32, "limit": 200},
            "search": {"num_samples": 1, "max_epochs": 1},
            "space": {"strategy": "linear_probe"},  # a lean trial on cached features: quick
        }
    )
    with current_cluster_file_as(None) as pointer:
        search = subprocess.run(
            [
                sys.executable,
                "-m",
                "raytl",
                "search",
                str(space),
                "--output",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert search.returncode == 0, search.stderr[-2000:]
        assert not pointer.exists()
    # the console shows raytl's lines only; Ray's and Tune's own output is in the log it names
    log = tmp_path / "out" / "ray-output.log"
    assert f"Ray's and Tune's own output: {log} (--verbose shows it here)" in search.stdout
    assert "0/1 done, 1 running, 0 queued, best" in search.stdout
    assert "search finished in" in search.stdout
    for ray_line in ("To visualize your results", "Number of trials", "(raylet)", "Trial status"):
        assert ray_line not in search.stdout + search.stderr, ray_line
    assert "To visualize your results" in log.read_text()
    with current_cluster_file_as(None), shared_ray_temp_restored():
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import ray; ray.init(num_cpus=1); print(ray.cluster_resources()['CPU']); ray.shutdown()",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 0 and other.stdout.strip().endswith("1.0"), other.stderr[-2000:]


@pytest.mark.slow
def test_two_searches_at_once_each_keep_their_own_ray(tmp_path, space_file):
    """Two local searches on one machine at the same time, ASHA stopping trials in both: each
    runs on its own Ray (its own temp folder and current-cluster file), both finish with every
    trial, the machine's current-cluster file is never touched, and both temp folders are gone."""
    body = {
        "data": {"source": "digits", "image_size": 32, "limit": 300},
        "scheme": {"kind": "holdout"},
        "search": {
            "num_samples": 4,
            "max_concurrent": 1,
            "max_epochs": 3,
            "grace_period": 1,
            "reduction_factor": 2,
            "scheduler": "asha",
        },
        "space": {
            "strategy": {"choice": ["linear_probe", "fine_tune"]},
            "freeze_depth": 6,
            "head_lr": {"loguniform": [1.0e-3, 3.0e-2]},
        },
    }
    before = set(Path(tempfile.gettempdir()).glob("raytl-ray-*"))
    with current_cluster_file_as("127.0.0.1:9") as pointer:
        searches = [
            subprocess.Popen(
                [sys.executable, "-m", "raytl", "search"]
                + [str(space_file({**body, "name": f"twin{i}"}, f"twin{i}.yaml"))]
                + ["--output", str(tmp_path / f"out{i}")],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # each search and the Ray it starts, to stop on a hang
            )
            for i in (1, 2)
        ]
        try:  # before raytl kept its own Ray temp folder, one of the two hung here (its refit)
            outputs = [search.communicate(timeout=600)[0] for search in searches]
        finally:
            for search in searches:
                if search.poll() is None:
                    os.killpg(search.pid, signal.SIGKILL)
                    search.wait()
                    remove_ray_temp_of(search.pid)
        assert pointer.read_text() == "127.0.0.1:9"
    for search, output in zip(searches, outputs, strict=True):
        assert search.returncode == 0, output[-3000:]
    for i in (1, 2):
        results = pd.read_parquet(tmp_path / f"out{i}" / "results.parquet")
        assert len(results) == 4 and results["trial_id"].is_unique
        assert set(results["status"]) <= {"completed", "stopped"}, results[["status", "error"]]
    after = set(Path(tempfile.gettempdir()).glob("raytl-ray-*"))
    assert after <= before


@pytest.mark.slow
def test_a_time_budget_ends_a_search_that_starts_from_its_seed_configs(tmp_path):
    """No num_samples, a 25 s budget: trials run until it ends (the first two are the seed
    configurations, in order), the best is refit, and the search says what ended it."""
    from raytl.rundir import END_FILE, read_trial_clock

    seeds = [{"head_lr": 0.004}, {"head_lr": 0.03}]
    space = {
        "name": "budget",
        "data": {"source": "digits", "image_size": 32, "limit": 300},
        "scheme": {"kind": "holdout"},
        "search": {"time_budget_s": 25, "max_concurrent": 1, "seed_configs": seeds},
        "space": {"strategy": "linear_probe", "head_lr": {"loguniform": [1.0e-3, 5.0e-2]}},
    }
    lines: list[str] = []
    table = run_search(parse_space(space, "budget.yaml"), tmp_path, echo=lines.append)
    ended = json.loads((tmp_path / END_FILE).read_text())
    assert ended["ended_by"] == "time_budget" and ended["seconds"] >= 25
    assert ended["trials"] == len(table) >= 3
    assert any("the time budget (25 s) ended the search" in line for line in lines)
    assert any("trials for 25 s" in line for line in lines)
    clock = read_trial_clock(tmp_path)
    first = sorted(clock, key=lambda t: clock[t]["launched_at"])[:2]
    by_id = table.set_index("trial_id")
    assert [by_id.loc[t, "head_lr"] for t in first] == pytest.approx([0.004, 0.03])
    assert (tmp_path / "best" / "model.safetensors").is_file()
