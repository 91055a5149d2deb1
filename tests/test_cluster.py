"""At scale: a search over several Ray nodes, and `raytl submit` to a token-protected head.

The clusters here are real: ``ray.cluster_utils.Cluster`` (a head and two worker nodes, each its own
raylet) and ``ray start --head --block`` as a process group the test owns and kills. Never
``ray stop``: it would end every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raytl.cluster import DASHBOARD_PORTS, dashboard_port, ephemeral_ports
from raytl.errors import RaytlError
from raytl.jobs import entrypoint, find_token, run_location
from raytl.rundir import new_run_id
from tests.conftest import remove_until_gone

TINY = {
    "name": "tiny",
    "data": {"source": "digits", "image_size": 48, "limit": 300, "test_fraction": 0.2},
    "model": {"backbone": "efficientnet_lite0", "pretrained": "package"},
    "scheme": {"kind": "segments", "segments": 2},
    "search": {"num_samples": 2, "max_concurrent": 1, "max_epochs": 1, "seed": 1},
    "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
    "space": {
        "strategy": "linear_probe",
        "head_lr": {"loguniform": [3.0e-3, 3.0e-2]},
        "batch_size": 32,
    },
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ token lookup (no cluster)


def test_find_token_follows_rays_precedence(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default\n")
    path = tmp_path / "token"
    path.write_text("from-path\n")
    assert (
        find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}, home).value
        == "from-env"
    )
    token = find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home)
    assert token.value == "from-path" and "RAY_AUTH_TOKEN_PATH" in token.source
    assert find_token({}, home).value == "from-default"
    assert find_token({}, tmp_path / "nobody") is None
    with pytest.raises(RaytlError, match="RAY_AUTH_TOKEN_PATH=.*cannot read"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(RaytlError, match="empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home)


def test_entrypoint_sends_uri_outputs_to_storage():
    line = entrypoint("s3://bucket/runs/x", ["data.limit=500"], 4, name="tiny", run_id="r1")
    assert "--set search.storage=s3://bucket/runs/x" in line and "--address auto" in line
    assert "--num-samples 4" in line and "--set data.limit=500" in line
    assert "--run-id r1" in line and "--output raytl-output/tiny-r1" in line
    local = entrypoint("/shared/runs", [], None, name="tiny", run_id="r2")
    assert "--output /shared/runs/tiny-r2" in local


def test_every_job_gets_a_run_folder_of_its_own():
    """Two submits of one space file once shared runs/NAME and --overwrite deleted each other's
    results, possibly mid-run."""
    lines = [entrypoint("/shared/runs", [], None, name="tiny", run_id=new_run_id()) for _ in "ab"]
    assert all("--overwrite" not in line for line in lines)
    outputs = [line.split("--output ", 1)[1].split()[0] for line in lines]
    assert outputs[0] != outputs[1] and all(o.startswith("/shared/runs/tiny-") for o in outputs)
    assert run_location("s3://b/runs?scheme=http", "tiny-r3") == "s3://b/runs/tiny-r3?scheme=http"


def test_submit_without_address_is_one_clear_line(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(TINY))
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    run = subprocess.run(
        [sys.executable, "-m", "raytl", "submit", str(space)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "no cluster address" in run.stderr
    assert "Traceback" not in run.stderr


def test_submit_to_unreachable_address_is_one_clear_line(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(TINY))
    port = _free_port()  # nothing listens there
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "raytl",
            "submit",
            str(space),
            "--address",
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        run.returncode == 2
        and f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in run.stderr
    )
    assert "Traceback" not in run.stderr


# ------------------------------------------------------------------ several nodes


@pytest.mark.slow
def test_search_spreads_over_nodes_and_writes_to_shared_storage(
    tmp_path, monkeypatch, restores_shared_ray_temp
):
    """A head with no CPUs and two 1-CPU worker nodes: each 2-worker trial must span both."""
    import ray
    from ray.cluster_utils import Cluster

    from raytl.cluster import cluster_wants_token
    from raytl.search import run_search
    from raytl.space_file import parse_space

    # a token lying around (as ~/.ray/auth_token often does) must not switch the driver to
    # token mode for a cluster without it: its raylets could not call back, trials would die
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(),
        },
    )
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        assert cluster_wants_token(cluster.address) is False
        storage = tmp_path / "shared" / "experiment"
        # fine-tuning the last block: a Ray Train trial (a cached linear probe would run lean,
        # in one process), whose two workers need both 1-CPU nodes
        space = {
            **TINY,
            "search": {**TINY["search"], "storage": str(storage)},
            "space": {
                **TINY["space"],
                "strategy": "fine_tune",
                "freeze_depth": 7,
                "backbone_lr": 1.0e-3,
            },
        }
        out = tmp_path / "out"
        out.mkdir()
        table = run_search(
            parse_space(space, "tiny.yaml"), out, address=cluster.address, echo=lambda line: None
        )
        worker_ids = {w.node_id for w in workers}
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert len(table) == 2 and set(table["status"]) == {"completed"}
    for _, row in table.iterrows():
        units = list(row["unit_nodes"])
        assert len(units) == 2 and set(units) == worker_ids  # one segment on each worker node
        assert set(row["nodes"].split(",")) == worker_ids
    # everything a reviewer needs is on the shared storage, not in a node-local folder, in the
    # run's own folder there
    run_id = json.loads((out / ".raytl-run.json").read_text())["run_id"]
    storage = storage / f"tiny-{run_id}"
    assert (storage / "results.parquet").is_file() and (storage / "report.md").is_file()
    assert len(pd.read_parquet(storage / "results.parquet")) == 2
    runs = [p for p in (storage / "tensorboard").iterdir() if p.name.startswith("trial_")]
    assert len(runs) == 2 and all(list(p.rglob("events.out.tfevents.*")) for p in runs)
    assert list(storage.glob("train_*/checkpoint_epoch_*/unit_0.pt"))
    assert list(storage.glob("train_*/checkpoint_epoch_*/unit_1.pt"))
    assert (storage / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_search_asking_more_than_the_cluster_has_fails_clearly(tmp_path, restores_shared_ray_temp):
    import ray
    from ray.cluster_utils import Cluster

    from raytl.search import run_search
    from raytl.space_file import parse_space

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        space = {**TINY, "resources": {"workers_per_trial": 2, "cpus_per_worker": 1}}
        with pytest.raises(RaytlError, match="needs 2 workers of 1.0 CPU.*fits only 1"):
            run_search(
                parse_space(space, "tiny.yaml"),
                tmp_path,
                address=cluster.address,
                echo=lambda line: None,
            )
        space = {
            **TINY,
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0.5},
        }
        with pytest.raises(RaytlError, match="0.5 GPU, but the largest node has 1 CPU and 0 GPU"):
            run_search(
                parse_space(space, "tiny.yaml"),
                tmp_path,
                address=cluster.address,
                echo=lambda line: None,
            )
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------ raytl submit, token auth


HEAD_LOGS: dict[str, Path] = {}  # the dashboard's address -> the head's own log file


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """``ray start --head --block`` with token auth on and the dashboard on 127.0.0.1, in a Ray
    temp folder of its own (not the shared ``/tmp/ray``), removed once the head has stopped."""
    token = secrets.token_hex(32)
    dashboard, gcs_port = _free_port(), _free_port()
    # the job's `python` is the head's: this environment's, as on a cluster image
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    ray_temp = Path(tempfile.mkdtemp(prefix="raytl-head-"))  # short: Ray's socket paths
    env = {
        **os.environ,
        "RAY_TMPDIR": str(ray_temp),  # the head, its job drivers and workers
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": path,
    }
    logs = tmp_path_factory.mktemp("head") / "head.log"
    HEAD_LOGS[f"http://127.0.0.1:{dashboard}"] = logs
    with logs.open("w") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("ray")),
                "start",
                "--head",
                "--block",
                f"--port={gcs_port}",
                "--num-cpus=2",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--include-dashboard=true",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the head did not start: {logs.read_text()[-2000:]}"
                    ) from None
                time.sleep(1)
        yield address, token, f"127.0.0.1:{gcs_port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        remove_until_gone(ray_temp)  # its processes may still be exiting, and writing there


def _raytl(
    *args: str, token: str | None, home: Path, timeout: int = 900
) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")
    }
    env["HOME"] = str(home)  # no ~/.ray/auth_token to fall back on
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "raytl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_submit_runs_the_search_as_a_job(head, tmp_path):
    address, token, _ = head
    space = tmp_path / "tiny.yaml"
    space.write_text(
        yaml.safe_dump({**TINY, "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}})
    )
    runs = tmp_path / "job-output"  # the head is this machine, so the folder is readable here
    run = _raytl(
        "submit",
        str(space),
        "--address",
        address,
        "--output",
        str(runs),
        token=token,
        home=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = run.stdout.split("submitted job ", 1)[1].split()[0]
    out = Path(run.stdout.split("results: ", 1)[1].split()[0])  # the job's own run folder
    assert out.parent == runs and out.name.startswith("tiny-")
    assert f"run {out.name}: output in {out}" in run.stdout  # named in the job's log
    assert f"job {job_id}: SUCCEEDED" in run.stdout
    assert "search finished" in run.stdout  # the job's own log lines were followed
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 2 and set(results["status"]) == {"completed"}
    assert (out / "best" / "metrics.json").is_file() and (out / "report.md").is_file()

    listed = _raytl("jobs", "--address", address, token=token, home=tmp_path, timeout=120)
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    assert str(out) in listed.stdout
    logs = _raytl("logs", job_id, "--address", address, token=token, home=tmp_path, timeout=120)
    assert logs.returncode == 0 and "search finished" in logs.stdout
    # the token appears in nothing raytl wrote or printed: results, reports, TensorBoard events,
    # checkpoints, the job's log, the head's log
    secret = token.encode()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("events.out.tfevents") for p in written)
    leaks = [str(p) for p in written if secret in p.read_bytes()]
    printed = run.stdout + run.stderr + listed.stdout + logs.stdout + logs.stderr
    assert leaks == [] and token not in printed
    assert secret not in HEAD_LOGS[address].read_bytes()


@pytest.mark.slow
def test_submit_with_a_wrong_or_missing_token_fails_clearly(head, tmp_path):
    address, _, _ = head
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY))
    wrong = _raytl(
        "submit", str(space), "--address", address, token="0" * 64, home=tmp_path, timeout=120
    )
    assert wrong.returncode == 2
    assert (
        f"the Ray cluster at {address} refused the auth token from RAY_AUTH_TOKEN" in wrong.stderr
    )
    assert "Traceback" not in wrong.stderr and "submitted job" not in wrong.stdout
    missing = _raytl("jobs", "--address", address, token=None, home=tmp_path, timeout=120)
    assert missing.returncode == 2
    assert "requires an auth token and none was found" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_search_on_a_token_cluster_without_a_token_fails_clearly(head, tmp_path):
    from raytl.cluster import cluster_wants_token

    _, _, gcs = head
    assert cluster_wants_token(gcs) is True
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY))
    run = _raytl(
        "search",
        str(space),
        "--address",
        gcs,
        "--output",
        str(tmp_path / "out"),
        token=None,
        home=tmp_path,
        timeout=120,
    )
    assert run.returncode == 2
    assert (
        f"the Ray cluster at {gcs} uses token authentication and no token was found" in run.stderr
    )
    assert "Traceback" not in run.stderr


def test_the_token_never_travels_in_plain_http_to_another_machine():
    from raytl.cluster import Token
    from raytl.jobs import check_transport

    token = Token("t" * 64, "RAY_AUTH_TOKEN")
    with pytest.raises(RaytlError, match="refusing to send the Ray auth token.*--insecure-http"):
        check_transport("http://ray-head.example:8265", token, insecure_http=False)
    with pytest.raises(RaytlError, match="plain http"):
        check_transport("http://10.0.0.5:8265", token, insecure_http=False)
    for fine in (
        "http://127.0.0.1:8265",
        "http://localhost:8265",
        "http://[::1]:8265",
        "https://ray-head.example",
    ):
        check_transport(fine, token, insecure_http=False)
    check_transport("http://ray-head.example:8265", None, insecure_http=False)  # no token to leak
    check_transport("http://ray-head.example:8265", token, insecure_http=True)  # the user's call


def test_the_local_token_file_is_made_private(tmp_path):
    from raytl.cluster import restrict_token_file

    token = tmp_path / "auth_token"
    token.write_text("t" * 64)
    token.chmod(0o644)  # as Ray writes it, with the default umask
    restrict_token_file({"RAY_AUTH_TOKEN_PATH": str(token)})
    assert token.stat().st_mode & 0o777 == 0o600
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t" * 64)
    (home / ".ray" / "auth_token").chmod(0o640)
    restrict_token_file({}, home)
    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600


def test_the_dashboard_port_is_drawn_where_no_process_of_rays_can_take_it(tmp_path):
    """Below the kernel's ephemeral range (bind(0) and outgoing connections take ports there,
    between the check and the dashboard's bind) and above Ray's worker ports; free when drawn."""
    ports = {dashboard_port() for _ in range(20)}
    assert all(p in DASHBOARD_PORTS and p < ephemeral_ports().start for p in ports), ports
    assert len(ports) > 1  # drawn, so two searches started together do not pick the same one
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("1024\t65000\n")
    assert ephemeral_ports(str(ranges)) == range(1024, 65001)
    assert ephemeral_ports(str(tmp_path / "none")) == range(32768, 61000)
